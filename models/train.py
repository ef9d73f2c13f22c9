"""The training loop of the bi-layer model: a conditional GAN on (source, target) pairs.

Stage `base` trains every generator network (Embedder, Texture Generator, projectors,
Keypoint MLP, Inference Generator) and the Discriminator; stage `enhancer` then trains
the Texture Enhancer alone with the base networks frozen. Each round is k discriminator
steps followed by one generator step (`models.gan.alternating_step`).

Checkpoints hold the model config, both networks, both optimisers, the step, the number
of batches drawn and every RNG state, so that a resumed run continues exactly where the
saved one stopped. Batches are a pure function of (seed, batch number), which is what
makes resuming exact.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import Tensor

from models import gan, losses
from models.bilayer import BilayerModel
from models.config import ModelConfig, get_config
from models.layers import apply_spectral_norm
from models.networks import Discriminator

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "bilayer-train/1"
Stage = Literal["base", "enhancer"]
GENERATOR_KEYS = (
    "loss/G/adv",
    "loss/G/fm",
    "loss/G/lf_l1",
    "loss/G/frame_l1",
    "loss/G/mask",
    "loss/G/warp",
)
# The columns of the progress bar, in this order.
PROGRESS_KEYS = (
    "loss/G/adv",
    "loss/G/fm",
    "loss/G/lf_l1",
    "loss/G/frame_l1",
    "loss/G/mask",
    "loss/D/real",
    "loss/D/fake",
)


@dataclass(frozen=True)
class TrainOptions:
    """Everything one training run depends on; saved in every checkpoint."""

    data_dir: Path
    out_dir: Path
    preset: str = "small"
    stage: Stage = "base"
    steps: int = 1000
    batch_size: int = 8
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    eps: float = 1e-7
    k_disc: int = 1
    adversarial: gan.AdversarialLoss = "rahinge"
    # Override of the preset's discriminator widths (6 values): the preset's full-width
    # discriminator dominates the cost of a CPU run. Saved in the checkpoint's config.
    disc_channels: tuple[int, ...] | None = None
    # Stage base: train the Texture Enhancer jointly instead of in a second stage.
    enhance_in_base: bool = False
    weights: losses.LossWeights = field(default_factory=losses.LossWeights)
    vgg19_weights: Path | None = None
    vggface_weights: Path | None = None
    resume: Path | None = None
    base_checkpoint: Path | None = None
    device: str = "cpu"
    seed: int = 0
    num_threads: int | None = None
    amp: bool = True
    log_every: int = 10
    image_every: int = 200
    checkpoint_every: int = 500
    checkpoint_minutes: float = 5.0
    keep_checkpoints: bool = True
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {
            key: str(value) if isinstance(value, Path) else value for key, value in data.items()
        }


# ---------------------------------------------------------------------------------------
# Networks and data
# ---------------------------------------------------------------------------------------


def build_networks(
    cfg: ModelConfig, spectral_norm: bool = True
) -> tuple[BilayerModel, Discriminator]:
    """The generator (`BilayerModel`) and the Discriminator, spectral norm on for training."""

    generator = BilayerModel(cfg, spectral_norm=spectral_norm)
    discriminator = Discriminator(cfg)
    if spectral_norm:
        apply_spectral_norm(discriminator)
    return generator, discriminator


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA) from one integer."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def batch_indices(
    batch_number: int, batch_size: int, num_items: int, seed: int
) -> list[tuple[int, int]]:
    """(epoch, dataset index) of every item of batch `batch_number`.

    Each epoch visits the dataset in a fresh permutation drawn from (seed, epoch); a batch
    may straddle two epochs.
    """
    items = []
    for slot in range(batch_size):
        epoch, position = divmod(batch_number * batch_size + slot, num_items)
        permutation = np.random.default_rng([seed, epoch]).permutation(num_items)
        items.append((epoch, int(permutation[position])))
    return items


def _image_tensor(value: Any) -> Tensor:
    """uint8 HWC / float CHW image (or a batch) -> float [B, 3, H, W] in [-1, 1]."""
    tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, Tensor) else value)
    if tensor.dtype == torch.uint8:
        tensor = tensor.float() / 127.5 - 1.0
        if tensor.shape[-1] == 3:
            tensor = tensor.movedim(-1, -3)
    return tensor.float()


def _mask_tensor(value: Any) -> Tensor:
    """float [B, H, W] or [B, 1, H, W] in [0, 1] (or uint8 0..255) -> [B, 1, H, W]."""
    tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, Tensor) else value)
    if tensor.dtype == torch.uint8:
        tensor = tensor.float() / 255.0
    tensor = tensor.float()
    if tensor.dim() == 3:
        tensor = tensor[:, None]
    return tensor


def collate(items: list[dict[str, Any]], device: torch.device | str) -> dict[str, Tensor]:
    """Stack dataset items into model tensors on `device` (images in [-1, 1])."""
    batch: dict[str, Tensor] = {}
    for side in ("source", "target"):
        batch[f"{side}_image"] = _image_tensor(
            torch.stack([_image_tensor(item[f"{side}_image"]) for item in items])
        )
        batch[f"{side}_stickman"] = torch.stack(
            [_image_tensor(item[f"{side}_stickman"]) for item in items]
        )
        batch[f"{side}_pose"] = torch.stack(
            [torch.as_tensor(np.asarray(item[f"{side}_pose"])).float() for item in items]
        )
        batch[f"{side}_mask"] = _mask_tensor(
            torch.stack([_mask_tensor(torch.as_tensor(item[f"{side}_mask"])[None])[0]
                         for item in items])
        )
    return {key: value.to(device) for key, value in batch.items()}


class BatchSource:
    """Deterministic batches: batch n is a pure function of (seed, n)."""

    def __init__(
        self, dataset: Any, batch_size: int, seed: int, device: torch.device | str
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("the training set is empty: expected at least one pair")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.drawn = 0

    def next(self) -> dict[str, Tensor]:
        slots = batch_indices(self.drawn, self.batch_size, len(self.dataset), self.seed)

        # A dataset that draws random numbers per item sees the same ones on resume.
        seed_everything(self.seed * 1_000_003 + self.drawn)
        items = []
        for epoch, index in slots:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)  # new source frames and augmentations
            items.append(self.dataset[index])
        self.drawn += 1
        return collate(items, self.device)


def open_dataset(data_dir: Path, image_size: int, split: str, seed: int) -> Any:
    """The pair dataset at `data_dir` (synthetic or prepared videos)."""
    from models.data.dataset import PairDataset

    return PairDataset(data_dir, image_size=image_size, split=split, seed=seed)


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every RNG state, as plain Python values and tensors (loadable with weights_only)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(np.asarray(keys).astype(np.int64)), int(position),
                  int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached = state["numpy"]
    keys = np.asarray(keys.numpy() if isinstance(keys, Tensor) else keys).astype(np.uint32)
    np.random.set_state((name, keys, int(position), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, trainer: Trainer) -> None:
    """Write a checkpoint atomically (temporary file, then rename)."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": trainer.cfg.to_dict(),
        "stage": trainer.options.stage,
        "step": trainer.step,
        "batches_drawn": trainer.batches.drawn,
        "model": trainer.generator.state_dict(),
        "discriminator": trainer.discriminator.state_dict(),
        "optim_g": trainer.optim_g.state_dict(),
        "optim_d": trainer.optim_d.state_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
        "rng": rng_state(),
        "options": trainer.options.to_dict(),
        "elapsed_s": trainer.elapsed_s(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)
    logger.info("saved checkpoint %s (step %d)", path, trainer.step)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a training checkpoint (or a bundle's generator-only checkpoint)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or "config" not in payload or "model" not in payload:
        raise ValueError(
            f"{path}: expected a checkpoint dict with 'config' and 'model', "
            f"got keys {sorted(payload)[:8] if isinstance(payload, dict) else type(payload)}"
        )
    return payload


def load_generator(path: Path, device: str = "cpu") -> BilayerModel:
    """A `BilayerModel` from a checkpoint, in eval mode with spectral norm removed."""
    from models.evaluate import load_model

    return load_model(path, device)


# ---------------------------------------------------------------------------------------
# Image grids for TensorBoard
# ---------------------------------------------------------------------------------------


def image_grid(columns: list[Tensor], rows: int = 4) -> Tensor:
    """Tile images [B, 3, H, W] in [-1, 1]: one row per sample, one column per tensor."""
    tiles = [column[:rows].detach().float().cpu().clamp(-1, 1) for column in columns]
    stacked = torch.stack(tiles, dim=1)  # [R, C, 3, H, W]
    count, width = stacked.shape[0], stacked.shape[1]
    height, size = stacked.shape[3], stacked.shape[4]
    grid = stacked.permute(2, 0, 3, 1, 4).reshape(3, count * height, width * size)
    return (grid + 1) / 2  # [3, R*H, C*W] in [0, 1]


# ---------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------


class Trainer:
    """Owns the networks, optimisers and data stream of one run; `run()` trains."""

    def __init__(
        self, options: TrainOptions, dataset: Any | None = None, cfg: ModelConfig | None = None
    ) -> None:
        """`cfg` overrides the preset (tests, experiments); a checkpoint's config wins."""
        if options.k_disc < 1:
            raise ValueError(f"k_disc must be >= 1, got {options.k_disc}")
        if options.stage not in ("base", "enhancer"):
            raise ValueError(f"stage must be 'base' or 'enhancer', got {options.stage!r}")
        if options.adversarial not in gan.ADVERSARIAL_LOSSES:
            raise ValueError(
                f"adversarial loss must be one of {gan.ADVERSARIAL_LOSSES}, "
                f"got {options.adversarial!r}"
            )

        self.options = options
        self.device = torch.device(options.device)
        if options.num_threads:
            torch.set_num_threads(options.num_threads)
        seed_everything(options.seed)

        # Networks: the config comes from the checkpoint when resuming.
        resume_payload = load_checkpoint(options.resume) if options.resume else None
        base_payload = None
        if options.stage == "enhancer" and resume_payload is None:
            if options.base_checkpoint is None:
                raise ValueError("stage 'enhancer' needs --base-checkpoint (or --resume)")
            base_payload = load_checkpoint(options.base_checkpoint)
        source_payload = resume_payload or base_payload
        if source_payload is not None:
            self.cfg = ModelConfig.from_dict(source_payload["config"])
        else:
            self.cfg = cfg or get_config(options.preset)
            if options.disc_channels is not None:
                self.cfg = replace(self.cfg, discriminator_channels=tuple(options.disc_channels))
        self.generator, self.discriminator = build_networks(self.cfg)
        self.generator.to(self.device)
        self.discriminator.to(self.device)

        # Data.
        if dataset is None:
            dataset = open_dataset(options.data_dir, self.cfg.image_size, "train", options.seed)
        self.batches = BatchSource(dataset, options.batch_size, options.seed, self.device)

        # Optimisers: the enhancer stage trains only the enhancer.
        if options.stage == "enhancer":
            trained = list(self.generator.enhancer.parameters())
        elif options.enhance_in_base:
            trained = list(self.generator.parameters())
        else:
            trained = [
                parameter
                for name, parameter in self.generator.named_parameters()
                if not name.startswith("enhancer.")
            ]
        self.trained_parameters = trained
        lr, betas, eps = options.lr, options.betas, options.eps
        self.optim_g = torch.optim.Adam(trained, lr=lr, betas=betas, eps=eps)
        self.optim_d = torch.optim.Adam(
            self.discriminator.parameters(), lr=lr, betas=betas, eps=eps
        )

        # Mixed precision on CUDA only: bf16 where supported, else fp16 with a scaler.
        self.amp_dtype: torch.dtype | None = None
        self.scaler: torch.amp.GradScaler | None = None
        if options.amp and self.device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                self.amp_dtype = torch.bfloat16
            else:
                self.amp_dtype = torch.float16
                self.scaler = torch.amp.GradScaler("cuda")

        # Optional perceptual losses from user-supplied weights.
        self.vgg19 = self.vggface = None
        if options.vgg19_weights is not None:
            self.vgg19 = losses.load_perceptual("vgg19", options.vgg19_weights).to(self.device)
        if options.vggface_weights is not None:
            self.vggface = losses.load_perceptual("vggface", options.vggface_weights)
            self.vggface.to(self.device)

        self.step = 0
        self.elapsed_before = 0.0
        self.started = time.monotonic()
        self.identity = cast(Tensor, self.generator.identity_grid)  # [1, H, W, 2]
        if resume_payload is not None:
            self._restore(resume_payload)
        elif base_payload is not None:
            self._start_from_base(base_payload)
        self._set_modes()

    # -- state -------------------------------------------------------------------------

    def _restore(self, payload: dict[str, Any]) -> None:
        if payload.get("stage", "base") != self.options.stage:
            raise ValueError(
                f"resume: checkpoint is from stage {payload.get('stage')!r}, "
                f"this run is stage {self.options.stage!r}"
            )
        self.generator.load_state_dict(payload["model"])
        self.discriminator.load_state_dict(payload["discriminator"])
        self.optim_g.load_state_dict(payload["optim_g"])
        self.optim_d.load_state_dict(payload["optim_d"])
        if self.scaler is not None and payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        self.step = int(payload["step"])
        self.batches.drawn = int(payload["batches_drawn"])
        self.elapsed_before = float(payload.get("elapsed_s", 0.0))
        set_rng_state(payload["rng"])
        logger.info("resumed from step %d", self.step)

    def _start_from_base(self, payload: dict[str, Any]) -> None:
        self.generator.load_state_dict(payload["model"])
        self.discriminator.load_state_dict(payload["discriminator"])
        logger.info("enhancer stage starts from the base model at step %d", payload["step"])

    def _set_modes(self) -> None:
        self.discriminator.train()
        if self.options.stage == "enhancer":
            # The frozen base model runs as at inference (batch norm running statistics).
            self.generator.eval()
            self.generator.enhancer.train()
            for name, parameter in self.generator.named_parameters():
                parameter.requires_grad_(name.startswith("enhancer."))
        else:
            self.generator.train()

    def elapsed_s(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started

    def _autocast(self) -> Any:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    # -- forward -----------------------------------------------------------------------

    def generate(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Register the source, render the target pose; what the losses need."""
        enhance = self.options.stage == "enhancer" or self.options.enhance_in_base
        with self._autocast():
            out = self.generator(
                batch["source_image"],
                batch["source_stickman"],
                batch["source_pose"],
                batch["target_pose"],
                batch["source_mask"],
                enhance=enhance,
            )
            source_out = None
            if enhance:
                source_out = self.generator.render(out.state, batch["source_pose"])
        target = out.target
        result = {
            "texture": out.state.texture,  # [B, 3, H, W]
            "frame": target.frame,  # [B, 3, H, W], background -1 by the predicted mask
            "lf": target.lf,  # [B, 3, H, W]
            "warped": target.warped,  # [B, 3, H, W]
            "uv": target.uv,  # [B, H, W, 2]
            "mask_logit": target.mask_logit,  # [B, 1, H, W]
            "mask": target.mask,  # [B, 1, H, W]
        }
        if source_out is not None:
            # The source re-rendered in its own pose: what the enhancer must reproduce.
            result["source_lf"] = source_out.lf
            result["source_warped"] = source_out.warped
        return result

    def discriminate(self, image: Tensor, stickman: Tensor) -> tuple[Tensor, list[Tensor]]:
        with self._autocast():
            scores, features = self.discriminator(image, stickman)
        return scores, list(features)

    # -- losses ------------------------------------------------------------------------

    def generator_losses(
        self, batch: dict[str, Tensor], fake: dict[str, Tensor], real: dict[str, Any]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted sum of the named generator terms, and the terms themselves."""
        weights = self.options.weights
        target = losses.composite(batch["target_image"], batch["target_mask"])  # [B, 3, H, W]
        terms: dict[str, Tensor] = {}

        # Adversarial and feature matching. The real scores and features come from the
        # last discriminator step (one D pass saved per round, as in pix2pixHD).
        fake_scores, fake_features = self.discriminate(fake["frame"], batch["target_stickman"])
        real_scores, real_features = real["scores"], real["features"]
        terms["loss/G/adv"] = losses.generator_adversarial(
            self.options.adversarial, real_scores, fake_scores
        )
        terms["loss/G/fm"] = losses.feature_matching(
            [f.float() for f in real_features], [f.float() for f in fake_features]
        )

        # The composed frame with its LF layer detached: trains the texture path only.
        frame_hf = losses.composite(
            fake["lf"].detach().float() + fake["warped"].float(), batch["target_mask"]
        )
        terms["loss/G/frame_l1"] = losses.frame_l1(frame_hf, target)

        if "source_warped" in fake:
            source = losses.composite(batch["source_image"], batch["source_mask"])
            source_hf = losses.composite(
                fake["source_lf"].detach().float() + fake["source_warped"].float(),
                batch["source_mask"],
            )
            terms["loss/G/source_l1"] = losses.frame_l1(source_hf, source)

        if self.options.stage == "base":
            terms["loss/G/lf_l1"] = losses.lf_l1(fake["lf"].float(), target)
            terms["loss/G/mask"] = losses.mask_bce(fake["mask_logit"], batch["target_mask"])
            delta_uv = fake["uv"].float() - self.identity  # [B, H, W, 2]
            terms["loss/G/warp"] = losses.warp_regulariser(delta_uv)

        if self.vgg19 is not None:
            terms["loss/G/vgg19"] = self.vgg19(frame_hf, target)
        if self.vggface is not None:
            terms["loss/G/vggface"] = self.vggface(frame_hf, target)

        total = torch.zeros((), device=self.device)
        for name, value in terms.items():
            total = total + getattr(weights, name.rsplit("/", 1)[1]) * value
        terms["loss/G/total"] = total
        return total, terms

    # -- one round ---------------------------------------------------------------------

    def _backward_step(self, loss: Tensor, optimiser: torch.optim.Optimizer) -> None:
        optimiser.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimiser)
            self.scaler.update()
        else:
            loss.backward()
            optimiser.step()

    def train_round(self) -> dict[str, Any]:
        """k discriminator steps, then one generator step; returns stats and the last
        batch and fake (for image logging)."""
        last: dict[str, Any] = {}
        d_steps_done = {"count": 0}

        def d_step() -> dict[str, Tensor]:
            batch = self.batches.next()
            d_steps_done["count"] += 1

            # The last D step generates with gradients: the G step reuses that output.
            if d_steps_done["count"] == self.options.k_disc:
                fake = self.generate(batch)
                last["fake_live"] = fake
            else:
                with torch.no_grad():
                    fake = self.generate(batch)
            target = losses.composite(batch["target_image"], batch["target_mask"])
            real_scores, real_features = self.discriminate(target, batch["target_stickman"])
            fake_scores, _ = self.discriminate(fake["frame"].detach(), batch["target_stickman"])
            terms = losses.discriminator_terms(self.options.adversarial, real_scores, fake_scores)
            self._backward_step(terms["loss/D/real"] + terms["loss/D/fake"], self.optim_d)
            last["batch"] = batch
            last["real"] = {
                "scores": real_scores.detach(),
                "features": [feature.detach() for feature in real_features],
            }
            return {name: value.detach() for name, value in terms.items()}

        def g_step() -> dict[str, Tensor]:
            # The generator trains on the last D batch, against the updated discriminator.
            batch, fake = last["batch"], last.pop("fake_live")
            total, terms = self.generator_losses(batch, fake, last.pop("real"))
            self._backward_step(total, self.optim_g)
            last["fake"] = {name: value.detach() for name, value in fake.items()}
            return {name: value.detach() for name, value in terms.items()}

        stats = gan.alternating_step(
            d_step,
            g_step,
            self.options.k_disc,
            generator=None,
            discriminator=self.discriminator,
        )
        self.step += 1
        return {"stats": stats, **last}

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> dict[str, float]:
        """Train until `options.steps` generator steps; returns the last statistics."""
        from torch.utils.tensorboard import SummaryWriter

        options = self.options
        out_dir = Path(options.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "options.json").write_text(json.dumps(options.to_dict(), indent=2))
        writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=self.step or None)
        metrics_file = (out_dir / "metrics.jsonl").open("a")
        last_saved = time.monotonic()
        stats: dict[str, float] = {}
        running: dict[str, float] = {}
        interrupted = {"flag": False}

        def on_signal(signum: int, _frame: Any) -> None:
            logger.warning("signal %d: saving a checkpoint and stopping", signum)
            interrupted["flag"] = True

        previous = signal.signal(signal.SIGTERM, on_signal)
        try:
            with _progress(options.progress) as progress:
                task = progress.add_task(
                    f"train {options.stage}", total=options.steps, completed=self.step, losses=""
                )
                while self.step < options.steps and not interrupted["flag"]:
                    round_out = self.train_round()
                    stats = round_out["stats"]
                    for name, value in stats.items():
                        running[name] = running.get(name, 0.0) + value
                    progress.update(task, advance=1, losses=_format_losses(stats))

                    if self.step % options.log_every == 0 or self.step == options.steps:
                        self._log_scalars(writer, metrics_file, running, options.log_every)
                        running = {}
                    if options.image_every and self.step % options.image_every == 0:
                        self._log_images(writer, round_out["batch"], round_out["fake"])

                    due_by_time = time.monotonic() - last_saved > options.checkpoint_minutes * 60
                    due_by_step = (
                        options.checkpoint_every and self.step % options.checkpoint_every == 0
                    )
                    if due_by_time or due_by_step:
                        self.save(keep=options.keep_checkpoints)
                        last_saved = time.monotonic()
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.save(keep=False)
            writer.close()
            metrics_file.close()
        return stats

    def save(self, keep: bool) -> Path:
        out_dir = Path(self.options.out_dir)
        path = out_dir / "last.pt"
        save_checkpoint(path, self)
        if keep:
            kept = out_dir / f"step_{self.step:07d}.pt"
            save_checkpoint(kept, self)
        return path

    def _log_scalars(
        self, writer: Any, metrics_file: Any, running: dict[str, float], every: int
    ) -> None:
        count = self.step % every or every
        means = {name: total / count for name, total in running.items()}
        for name, value in means.items():
            writer.add_scalar(name, value, self.step)
        record = {"step": self.step, "elapsed_s": round(self.elapsed_s(), 2), **means}
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        logger.info("step %d %s", self.step, _format_losses(means))

    def _log_images(self, writer: Any, batch: dict[str, Tensor], fake: dict[str, Tensor]) -> None:
        columns = [
            batch["source_image"],
            batch["target_stickman"],
            fake["texture"],
            fake["lf"],
            fake["warped"],
            fake["frame"],
            losses.composite(batch["target_image"], batch["target_mask"]),
        ]
        writer.add_image(
            "images/source|driver|texture|lf|warped|output|target",
            image_grid(columns),
            self.step,
        )


def _format_losses(stats: dict[str, float]) -> str:
    parts = []
    for name in PROGRESS_KEYS:
        if name in stats:
            parts.append(f"{name.removeprefix('loss/')} {stats[name]:.3f}")
    return " ".join(parts)


def _progress(enabled: bool) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[losses]}"),
        disable=not enabled,
    )


def train(
    options: TrainOptions, dataset: Any | None = None, cfg: ModelConfig | None = None
) -> dict[str, float]:
    """Build a trainer from `options` and run it to `options.steps`."""
    return Trainer(options, dataset, cfg).run()


__all__ = [
    "CHECKPOINT_FORMAT",
    "GENERATOR_KEYS",
    "Trainer",
    "TrainOptions",
    "batch_indices",
    "build_networks",
    "image_grid",
    "load_checkpoint",
    "load_generator",
    "save_checkpoint",
    "seed_everything",
    "train",
]
