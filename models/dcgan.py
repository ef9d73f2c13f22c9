"""The DCGAN reference (Radford et al., ICLR 2016) at 64x64 and its training entry point.

The networks follow the paper's architecture rules:

- no pooling: the generator upsamples with strided transposed convolutions, the
  discriminator downsamples with strided convolutions;
- batch norm in both networks, except the generator's output layer and the
  discriminator's input layer;
- no fully connected hidden layers: the latent vector is the 1x1 input of the first
  transposed convolution, and the discriminator's last convolution maps 4x4 to 1x1;
- ReLU in the generator with a tanh output, LeakyReLU(0.2) in the discriminator with a
  sigmoid output (returned as a logit; ``probability`` applies the sigmoid);
- weights drawn from N(0, 0.02).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from models.gan import AdversarialLoss, AdversarialTrainer

logger = logging.getLogger(__name__)

IMAGE_SIZE = 64
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass(frozen=True)
class DcganConfig:
    """Widths of the DCGAN pair; ``width`` is the channel count at 32x32 (64 in the paper)."""

    latent_dim: int = 100
    width: int = 64
    image_channels: int = 3

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, int]) -> DcganConfig:
        return cls(**values)


def init_dcgan_weights(module: nn.Module) -> None:
    """Convolution weights from N(0, 0.02); batch-norm scales from N(1, 0.02), biases 0."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class DcganGenerator(nn.Module):
    """z [B, latent_dim] -> image [B, C, 64, 64] in [-1, 1]."""

    def __init__(self, config: DcganConfig = DcganConfig()) -> None:
        super().__init__()
        self.config = config
        w = config.width

        def up(c_in: int, c_out: int) -> list[nn.Module]:
            # Stride-2 transposed conv doubles the resolution; no bias before batch norm.
            return [
                nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]

        self.net = nn.Sequential(
            # Project and reshape: the 1x1 latent "image" to 4x4 by a transposed conv.
            nn.ConvTranspose2d(config.latent_dim, 8 * w, 4, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(8 * w),
            nn.ReLU(inplace=True),  # [B, 8w, 4, 4]
            *up(8 * w, 4 * w),  # [B, 4w, 8, 8]
            *up(4 * w, 2 * w),  # [B, 2w, 16, 16]
            *up(2 * w, w),  # [B, w, 32, 32]
            nn.ConvTranspose2d(w, config.image_channels, 4, stride=2, padding=1, bias=False),
            nn.Tanh(),  # [B, C, 64, 64]
        )
        self.apply(init_dcgan_weights)

    def forward(self, z: Tensor) -> Tensor:
        if z.ndim != 2 or z.shape[1] != self.config.latent_dim:
            raise ValueError(f"latent must be [B, {self.config.latent_dim}], got {tuple(z.shape)}")
        return self.net(z[:, :, None, None])  # [B, C, 64, 64]


class DcganDiscriminator(nn.Module):
    """image [B, C, 64, 64] -> logit [B]; ``probability`` gives sigmoid(logit)."""

    def __init__(self, config: DcganConfig = DcganConfig()) -> None:
        super().__init__()
        self.config = config
        w = config.width

        def down(c_in: int, c_out: int, norm: bool) -> nn.Sequential:
            # Stride-2 conv halves the resolution; no bias before batch norm.
            layers: list[nn.Module] = [
                nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=not norm)
            ]
            if norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            return nn.Sequential(*layers)

        self.blocks = nn.ModuleList(
            [
                down(config.image_channels, w, norm=False),  # [B, w, 32, 32]
                down(w, 2 * w, norm=True),  # [B, 2w, 16, 16]
                down(2 * w, 4 * w, norm=True),  # [B, 4w, 8, 8]
                down(4 * w, 8 * w, norm=True),  # [B, 8w, 4, 4]
            ]
        )
        self.head = nn.Conv2d(8 * w, 1, 4, stride=1, padding=0)  # [B, 1, 1, 1]
        self.apply(init_dcgan_weights)

    def features(self, image: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``(logit [B], block activations)``; the activations serve feature matching."""
        expected = (self.config.image_channels, IMAGE_SIZE, IMAGE_SIZE)
        if image.ndim != 4 or tuple(image.shape[1:]) != expected:
            raise ValueError(
                f"image must be [B, {', '.join(map(str, expected))}], got {tuple(image.shape)}"
            )

        feats = []
        h = image
        for block in self.blocks:
            h = block(h)
            feats.append(h)
        logit = self.head(h).flatten()  # [B]
        return logit, feats

    def forward(self, image: Tensor) -> Tensor:
        return self.features(image)[0]  # [B] logits

    def probability(self, image: Tensor) -> Tensor:
        """D(x) = sigmoid(logit): the probability that ``image`` is real."""
        return torch.sigmoid(self(image))  # [B]


# ---------------------------------------------------------------------------------------
# Images in and out (PIL only).
# ---------------------------------------------------------------------------------------


def load_image(path: Path, size: int = IMAGE_SIZE) -> np.ndarray:
    """An RGB image resized (shorter side to ``size``) and centre-cropped: uint8 [S, S, 3]."""
    from PIL import Image

    with Image.open(path) as raw:
        image = raw.convert("RGB")
    scale = size / min(image.size)
    resized = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
    image = image.resize(resized, Image.Resampling.BICUBIC)
    left = (image.width - size) // 2
    top = (image.height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def load_image_folder(image_dir: str | Path, size: int = IMAGE_SIZE) -> Tensor:
    """Every image under ``image_dir`` (recursively), as uint8 [N, 3, S, S] in memory.

    Memory is 3 * S * S bytes per image (12 KiB at 64x64).
    """
    root = Path(image_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")

    images = np.stack([load_image(p, size) for p in paths])  # [N, S, S, 3]
    logger.info("loaded %d images from %s at %dx%d", len(paths), root, size, size)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # [N, 3, S, S]


def save_image_grid(images: Tensor, path: str | Path, columns: int = 8, pad: int = 2) -> Path:
    """Write images [N, C, H, W] in [-1, 1] as one PNG grid, ``columns`` wide."""
    from PIL import Image

    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1|3, H, W], got {tuple(images.shape)}")

    n, c, h, w = images.shape
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    tiles = pixels.expand(n, 3, h, w).permute(0, 2, 3, 1).numpy()  # [N, H, W, 3]

    grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), dtype=np.uint8)
    for index in range(n):
        row, col = divmod(index, columns)
        y, x = pad + row * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = tiles[index]

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


def _batches(images: Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless shuffled batches (uint8 [B, 3, S, S]); reshuffles after each pass."""
    order = torch.empty(0, dtype=torch.long)
    while True:
        while order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(images.shape[0], generator=generator)])
        yield images[order[:batch_size]]
        order = order[batch_size:]


# ---------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------


@dataclass
class DcganTrainResult:
    """What a training run left behind, and its last statistics."""

    checkpoint: Path
    samples: list[Path] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    steps: int = 0


def load_dcgan_generator(checkpoint: str | Path, device: str = "cpu") -> DcganGenerator:
    """The generator of a ``train_dcgan`` checkpoint, in eval mode."""
    state = torch.load(checkpoint, map_location=device, weights_only=True)
    generator = DcganGenerator(DcganConfig.from_dict(state["config"])).to(device)
    generator.load_state_dict(state["generator"])
    return generator.eval()


def _sample_grid(generator: nn.Module, latent: Tensor, path: Path) -> Path:
    # A copy in training mode: batch statistics, as during training, without touching
    # the running averages of the generator being trained.
    with torch.no_grad():
        images = copy.deepcopy(generator).train()(latent)  # [N, C, 64, 64]
    return save_image_grid(images, path)


def train_dcgan(
    image_dir: str | Path,
    out_dir: str | Path,
    steps: int = 5000,
    batch_size: int = 64,
    k_disc: int = 1,
    device: str = "cpu",
    seed: int = 0,
    *,
    sample_every: int = 500,
    config: DcganConfig | None = None,
    loss: AdversarialLoss = "non_saturating",
    lr: float = 2e-4,
    progress: bool = True,
) -> DcganTrainResult:
    """Train the DCGAN pair on a folder of images; write sample grids and a checkpoint.

    Adam (lr 2e-4, betas (0.5, 0.999)) for both players, ``k_disc`` discriminator
    steps per generator step. Writes ``out_dir/samples/step_NNNNNN.png`` every
    ``sample_every`` steps and at the end, ``out_dir/checkpoint.pt`` at the end, and
    TensorBoard scalars under ``out_dir/tensorboard``.
    """
    for name, value in (
        ("steps", steps),
        ("batch_size", batch_size),
        ("k_disc", k_disc),
        ("sample_every", sample_every),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")

    from rich.progress import Progress
    from torch.utils.tensorboard import SummaryWriter

    config = config or DcganConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # Data in memory as uint8; batches become float [-1, 1] on the device.
    images = load_image_folder(image_dir)
    data_order = torch.Generator().manual_seed(seed)
    batches = _batches(images, batch_size, data_order)

    def next_real() -> Tensor:
        return next(batches).to(device).float() / 127.5 - 1.0  # [B, 3, 64, 64]

    # Networks, optimisers and the alternating trainer.
    torch.manual_seed(seed)
    generator = DcganGenerator(config).to(device)
    discriminator = DcganDiscriminator(config).to(device)
    g_optimizer = torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.5, 0.999))
    d_optimizer = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(0.5, 0.999))
    trainer = AdversarialTrainer(
        generator,
        discriminator,
        g_optimizer,
        d_optimizer,
        latent_dim=config.latent_dim,
        loss=loss,
        k_disc=k_disc,
    )
    fixed_latent = torch.randn(
        64, config.latent_dim, generator=torch.Generator().manual_seed(seed + 1)
    ).to(device)  # [64, Z]
    logger.info(
        "training DCGAN: %d images, %d steps, batch %d, k_disc %d, loss %s, device %s",
        images.shape[0],
        steps,
        batch_size,
        k_disc,
        loss,
        device,
    )

    result = DcganTrainResult(checkpoint=out / "checkpoint.pt")
    writer = SummaryWriter(log_dir=str(out / "tensorboard"))
    try:
        with Progress(disable=not progress, transient=False) as bar:
            task = bar.add_task("DCGAN", total=steps)
            for step in range(1, steps + 1):
                result.stats = trainer.step(next_real)
                for name, stat in result.stats.items():
                    writer.add_scalar(name, stat, step)
                if not all(math.isfinite(v) for v in result.stats.values()):
                    raise FloatingPointError(f"non-finite loss at step {step}: {result.stats}")

                bar.update(
                    task,
                    advance=1,
                    description=(
                        f"DCGAN D {result.stats['loss/D/total']:.3f} "
                        f"G {result.stats['loss/G/adv']:.3f}"
                    ),
                )
                if step % sample_every == 0 or step == steps:
                    path = out / "samples" / f"step_{step:06d}.png"
                    result.samples.append(_sample_grid(generator, fixed_latent, path))
                    summary = " ".join(f"{k}={v:.4g}" for k, v in result.stats.items())
                    logger.info("step %d: %s; samples %s", step, summary, path)
    finally:
        writer.close()

    # Final checkpoint: both players, optimisers and the options to rebuild them.
    torch.save(
        {
            "format": "dcgan",
            "config": config.to_dict(),
            "generator": generator.state_dict(),
            "discriminator": discriminator.state_dict(),
            "g_optimizer": g_optimizer.state_dict(),
            "d_optimizer": d_optimizer.state_dict(),
            "step": steps,
            "loss": loss,
            "k_disc": k_disc,
            "seed": seed,
        },
        result.checkpoint,
    )
    result.steps = steps
    logger.info("wrote %s", result.checkpoint)
    return result
