"""The training loop: a loss falls on a fixed batch, resuming is exact, the enhancer stage
trains only the enhancer, perceptual losses load user weights."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage import data as skdata

from models import losses
from models.config import get_config
from models.data.dataset import PairDataset
from models.data.prepare import PrepareOptions, find_photo_jobs, prepare
from models.train import (
    Trainer,
    TrainOptions,
    batch_indices,
    collate,
    image_grid,
    load_checkpoint,
    load_generator,
)

SIZE = 64
# The small preset at 64 px with a narrow discriminator: seconds per step on one core.
CFG = replace(
    get_config("small"),
    image_size=SIZE,
    discriminator_channels=(8, 8, 16, 16, 16, 16),
    enhancer_blocks=1,
    enhancer_steps=2,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """Synthetic clips of a real photo (the astronaut), made by the real data pipeline."""
    root = tmp_path_factory.mktemp("train-data")
    photos = root / "photos" / "collins"
    photos.mkdir(parents=True)
    cv2.imwrite(str(photos / "astronaut.jpg"), cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR))
    options = PrepareOptions(
        image_size=SIZE, clips_per_photo=2, frames_per_clip=4, split="train", workers=1
    )
    report = prepare(find_photo_jobs(root / "photos", options), root / "clips", options)
    assert report.frames_written == 8
    return root / "clips"


def _options(tmp_path: Path, data: Path, **changes) -> TrainOptions:
    base = TrainOptions(
        data_dir=data,
        out_dir=tmp_path / "run",
        steps=2,
        batch_size=2,
        log_every=1,
        image_every=1,
        checkpoint_every=0,
        checkpoint_minutes=1e6,
        keep_checkpoints=False,
        progress=False,
    )
    return replace(base, **changes)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def test_batches_are_a_pure_function_of_seed_and_number():
    first = batch_indices(3, 4, 10, seed=1)
    assert first == batch_indices(3, 4, 10, seed=1)
    assert first != batch_indices(3, 4, 10, seed=2)

    # one epoch visits every item once; batch 2 of 4 items straddles epochs 0 and 1
    epoch0 = [index for n in range(5) for _, index in batch_indices(n, 2, 10, seed=0)]
    assert sorted(epoch0) == list(range(10))
    assert [epoch for epoch, _ in batch_indices(2, 4, 10, seed=0)] == [0, 0, 1, 1]


def test_generator_reconstruction_loss_falls_on_a_fixed_batch(tmp_path, pairs):
    trainer = Trainer(_options(tmp_path, pairs), cfg=CFG)
    batch = trainer.batches.next()

    def reconstruction() -> float:
        terms = trainer.generator_losses(batch, trainer.generate(batch), _real(trainer, batch))[1]
        return float((terms["loss/G/lf_l1"] + terms["loss/G/frame_l1"]).detach())

    trainer.generator.train()
    first = reconstruction()
    for _ in range(6):
        fake = trainer.generate(batch)
        total, _ = trainer.generator_losses(batch, fake, _real(trainer, batch))
        trainer._backward_step(total, trainer.optim_g)
    assert reconstruction() < 0.9 * first


def _real(trainer: Trainer, batch: dict[str, torch.Tensor]) -> dict[str, object]:
    with torch.no_grad():
        target = losses.composite(batch["target_image"], batch["target_mask"])
        scores, features = trainer.discriminate(target, batch["target_stickman"])
    return {"scores": scores, "features": features}


def test_one_round_updates_both_networks_and_logs_named_terms(tmp_path, pairs):
    trainer = Trainer(_options(tmp_path, pairs), cfg=CFG)
    g_before, d_before = _state(trainer.generator), _state(trainer.discriminator)
    out = trainer.train_round()

    for name in ("adv", "fm", "lf_l1", "frame_l1", "mask", "warp"):
        assert np.isfinite(out["stats"][f"loss/G/{name}"])
    assert out["stats"]["loss/D/real"] >= 0 and out["stats"]["loss/D/fake"] >= 0
    g_after, d_after = trainer.generator.state_dict(), trainer.discriminator.state_dict()
    assert any(not torch.equal(g_before[k], g_after[k]) for k in g_before)
    assert any(not torch.equal(d_before[k], d_after[k]) for k in d_before)

    # the base stage leaves the enhancer alone
    enhancer = [k for k in g_before if k.startswith("enhancer.") and "weight" in k]
    assert enhancer and all(torch.equal(g_before[k], g_after[k]) for k in enhancer)

    # the image grid: 7 columns (source, driver, texture, LF, warped, output, target)
    grid = image_grid([out["batch"]["source_image"]] * 7, rows=2)
    assert grid.shape == (3, 2 * SIZE, 7 * SIZE) and 0 <= grid.min() <= grid.max() <= 1


def test_resume_continues_exactly(tmp_path, pairs):
    straight = _options(tmp_path / "a", pairs, steps=4, k_disc=2)
    Trainer(straight, cfg=CFG).run()
    reference = load_checkpoint(straight.out_dir / "last.pt")

    half = _options(tmp_path / "b", pairs, steps=2, k_disc=2)
    Trainer(half, cfg=CFG).run()
    resumed = replace(half, steps=4, resume=half.out_dir / "last.pt")
    Trainer(resumed, cfg=CFG).run()
    result = load_checkpoint(half.out_dir / "last.pt")

    assert result["step"] == reference["step"] == 4
    assert result["batches_drawn"] == reference["batches_drawn"] == 8
    for network in ("model", "discriminator"):
        for key, value in reference[network].items():
            torch.testing.assert_close(result[network][key], value, rtol=0, atol=1e-6)

    # a training checkpoint loads without unpickling code
    payload = torch.load(half.out_dir / "last.pt", map_location="cpu", weights_only=True)
    assert payload["config"]["image_size"] == SIZE

    # metrics: one JSON line per step with the named terms
    lines = (half.out_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert "loss/D/fake" in json.loads(lines[-1])
    assert list((half.out_dir / "tensorboard").iterdir())


def test_enhancer_stage_trains_only_the_enhancer(tmp_path, pairs):
    base = _options(tmp_path / "base", pairs, steps=1)
    Trainer(base, cfg=CFG).run()

    stage2 = _options(
        tmp_path / "enh", pairs, steps=1, stage="enhancer",
        base_checkpoint=base.out_dir / "last.pt",
    )
    trainer = Trainer(stage2)
    before = _state(trainer.generator)
    stats = trainer.train_round()["stats"]
    after = trainer.generator.state_dict()

    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("enhancer.") for k in changed)
    assert "loss/G/source_l1" in stats and "loss/G/lf_l1" not in stats

    # the eval-mode generator loads from the training checkpoint and renders
    trainer.save(keep=False)
    model = load_generator(stage2.out_dir / "last.pt")
    dataset = PairDataset(pairs, image_size=SIZE, split="train")
    batch = collate([dataset[0]], "cpu")
    with torch.no_grad():
        state = model.register(batch["source_image"], batch["source_stickman"],
                               batch["source_pose"], batch["source_mask"])
        frame = model.render(state, batch["target_pose"]).frame
    assert frame.shape == (1, 3, SIZE, SIZE) and torch.isfinite(frame).all()


def test_bad_options_are_refused(tmp_path, pairs):
    with pytest.raises(ValueError, match="k_disc"):
        Trainer(_options(tmp_path, pairs, k_disc=0), cfg=CFG)
    with pytest.raises(ValueError, match="base-checkpoint"):
        Trainer(_options(tmp_path, pairs, stage="enhancer"), cfg=CFG)
    with pytest.raises(ValueError, match="adversarial"):
        Trainer(_options(tmp_path, pairs, adversarial="wasserstein"), cfg=CFG)


@pytest.mark.parametrize("kind", ["vgg19", "vggface"])
def test_perceptual_loss_loads_user_weights(tmp_path, kind):
    layout = "vgg19" if kind == "vgg19" else "vgg16"
    network = losses.VGGFeatures(layout, losses.IMAGENET_MEAN, losses.IMAGENET_STD)
    path = tmp_path / f"{kind}.pt"
    state = {f"features.{k}": v for k, v in network.features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # ignored
    torch.save(state, path)

    loss = losses.load_perceptual(kind, path)
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    assert float(loss(image, image)) == 0.0
    assert float(loss(image, -image)) > 0.0

    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="features.N"):
        losses.load_perceptual(kind, path)


def test_loss_terms_on_known_values():
    image = torch.full((1, 3, 4, 4), 0.5)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2] = 1.0
    out = losses.composite(image, mask)
    assert torch.all(out[..., :2] == 0.5) and torch.all(out[..., 2:] == -1.0)

    delta = torch.zeros(1, 4, 4, 2)
    delta[..., 0] = 0.2
    assert float(losses.warp_regulariser(delta)) == pytest.approx(0.1)
    logits = torch.full((1, 1, 4, 4), 20.0)
    assert float(losses.mask_bce(logits, torch.ones_like(logits))) < 1e-6
