"""The DCGAN reference: shapes, the architecture rules, training sanity, the entry point."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from models.dcgan import (
    DcganConfig,
    DcganDiscriminator,
    DcganGenerator,
    load_dcgan_generator,
    load_image,
    load_image_folder,
    save_image_grid,
    train_dcgan,
)
from models.gan import AdversarialTrainer

TINY = DcganConfig(latent_dim=16, width=8)


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------
# Shapes.
# ---------------------------------------------------------------------------------------


def test_shapes_and_output_ranges() -> None:
    torch.manual_seed(0)
    generator, discriminator = DcganGenerator(), DcganDiscriminator()
    images = generator(torch.randn(2, 100))
    assert images.shape == (2, 3, 64, 64)
    assert images.min() >= -1.0 and images.max() <= 1.0

    logits = discriminator(images)
    assert logits.shape == (2,)
    assert torch.allclose(discriminator.probability(images), torch.sigmoid(logits))

    logit, feats = discriminator.features(images)
    assert torch.equal(logit, logits)
    assert [tuple(f.shape) for f in feats] == [
        (2, 64, 32, 32),
        (2, 128, 16, 16),
        (2, 256, 8, 8),
        (2, 512, 4, 4),
    ]


def test_bad_shapes_raise_clear_errors() -> None:
    generator, discriminator = DcganGenerator(TINY), DcganDiscriminator(TINY)
    with pytest.raises(ValueError, match=r"latent must be \[B, 16\], got \(2, 100\)"):
        generator(torch.randn(2, 100))
    with pytest.raises(ValueError, match=r"image must be \[B, 3, 64, 64\], got \(2, 3, 32, 32\)"):
        discriminator(torch.randn(2, 3, 32, 32))


def test_parameter_counts_match_the_paper_architecture() -> None:
    # Counted from the layer list: 4x4 kernels, channels 100-512-256-128-64-3 (G) and
    # 3-64-128-256-512-1 (D), batch norm scale + bias, biases only where no norm follows.
    g_convs = [(100, 512), (512, 256), (256, 128), (128, 64), (64, 3)]
    g_expected = sum(16 * a * b for a, b in g_convs) + 2 * (512 + 256 + 128 + 64)
    d_convs = [(3, 64), (64, 128), (128, 256), (256, 512), (512, 1)]
    d_expected = sum(16 * a * b for a, b in d_convs) + (64 + 1) + 2 * (128 + 256 + 512)

    assert sum(p.numel() for p in DcganGenerator().parameters()) == g_expected == 3_576_704
    assert sum(p.numel() for p in DcganDiscriminator().parameters()) == d_expected


# ---------------------------------------------------------------------------------------
# The DCGAN rules, checked on the module structure.
# ---------------------------------------------------------------------------------------

POOLING = (
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.LPPool2d,
    nn.Upsample,
)


def leaf_modules(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if not list(m.children())]


def test_no_pooling_no_fully_connected_layers() -> None:
    for network in (DcganGenerator(), DcganDiscriminator()):
        leaves = leaf_modules(network)
        assert not any(isinstance(m, POOLING) for m in leaves)
        assert not any(isinstance(m, nn.Linear | nn.Bilinear) for m in leaves)


def test_generator_rules() -> None:
    leaves = leaf_modules(DcganGenerator())
    convs = [m for m in leaves if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]

    # Only transposed convs; resolution doubles at every one after the 1x1 -> 4x4 projection.
    assert all(isinstance(m, nn.ConvTranspose2d) for m in convs)
    assert [m.stride for m in convs] == [(1, 1)] + [(2, 2)] * 4

    # Batch norm after every conv but the output; ReLU inside, tanh at the end.
    assert sum(isinstance(m, nn.BatchNorm2d) for m in leaves) == len(convs) - 1
    assert isinstance(leaves[-1], nn.Tanh) and isinstance(leaves[-2], nn.ConvTranspose2d)
    activations = [m for m in leaves if not isinstance(m, nn.ConvTranspose2d | nn.BatchNorm2d)]
    assert all(isinstance(m, nn.ReLU) for m in activations[:-1])
    assert not any(isinstance(m, nn.LeakyReLU) for m in leaves)


def test_discriminator_rules() -> None:
    discriminator = DcganDiscriminator()
    leaves = leaf_modules(discriminator)
    convs = [m for m in leaves if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]

    # Strided convs down to 4x4, then one 4x4 conv to a single logit.
    assert all(type(m) is nn.Conv2d for m in convs)
    assert [m.stride for m in convs] == [(2, 2)] * 4 + [(1, 1)]

    # No batch norm on the input layer, batch norm on the other three hidden layers.
    first = leaf_modules(discriminator.blocks[0])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in first)
    for block in discriminator.blocks[1:]:
        assert any(isinstance(m, nn.BatchNorm2d) for m in leaf_modules(block))

    # LeakyReLU(0.2) only; the output is a logit, sigmoid via probability().
    relus = [m for m in leaves if isinstance(m, nn.ReLU | nn.LeakyReLU)]
    assert len(relus) == 4
    assert all(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.2 for m in relus)
    assert leaves[-1] is discriminator.head


def test_weight_init_is_normal_002() -> None:
    torch.manual_seed(0)
    generator = DcganGenerator()
    layer = generator.net[3]
    assert isinstance(layer, nn.ConvTranspose2d)
    big = layer.weight.detach()  # [512, 256, 4, 4]: 2M draws
    assert float(big.mean()) == pytest.approx(0.0, abs=1e-3)
    assert float(big.std()) == pytest.approx(0.02, rel=0.01)

    norms = [m for m in generator.modules() if isinstance(m, nn.BatchNorm2d)]
    scales = torch.cat([m.weight.detach() for m in norms])
    assert float(scales.mean()) == pytest.approx(1.0, abs=0.005)
    assert float(scales.std()) == pytest.approx(0.02, rel=0.15)
    assert all(float(m.bias.detach().abs().max()) == 0.0 for m in norms)


# ---------------------------------------------------------------------------------------
# Training sanity: tiny networks on a trivial image distribution.
# ---------------------------------------------------------------------------------------

COLOUR = torch.tensor([0.6, -0.5, 0.2])  # the data: flat images of this colour, jittered


def flat_images(n: int) -> torch.Tensor:
    colours = COLOUR + 0.1 * torch.randn(n, 3)  # [n, 3]
    return colours[:, :, None, None].expand(n, 3, 64, 64).contiguous()  # [n, 3, 64, 64]


def test_alternating_training_separates_then_moves_samples_to_data() -> None:
    # 100 rounds, batch 8: first D separates real from fake, then G's samples approach the
    # data colour. The RMS pixel distance starts near 0.5 (G outputs near 0).
    torch.manual_seed(0)
    generator, discriminator = DcganGenerator(TINY), DcganDiscriminator(TINY)
    trainer = AdversarialTrainer(
        generator,
        discriminator,
        torch.optim.Adam(generator.parameters(), lr=2e-3, betas=(0.5, 0.999)),
        torch.optim.Adam(discriminator.parameters(), lr=2e-3, betas=(0.5, 0.999)),
        latent_dim=TINY.latent_dim,
        loss="non_saturating",
    )
    latent = torch.randn(64, TINY.latent_dim)

    def distance() -> float:
        with torch.no_grad():
            samples = generator(latent)  # [64, 3, 64, 64]
        return float((samples - COLOUR[None, :, None, None]).pow(2).mean().sqrt())

    start = distance()
    early = [trainer.step(lambda: flat_images(8)) for _ in range(10)]
    assert all(s["score/real"] > s["score/fake"] for s in early[3:])
    assert early[-1]["loss/D/total"] < 2.0 * math.log(2.0)  # better than chance

    for _ in range(90):
        stats = trainer.step(lambda: flat_images(8))
    end = distance()

    assert start > 0.4
    assert end < start / 2.0, f"RMS distance to the data colour {start:.3f} -> {end:.3f}"
    assert all(math.isfinite(v) for v in stats.values())


# ---------------------------------------------------------------------------------------
# Images in and out, and the training entry point.
# ---------------------------------------------------------------------------------------


def test_load_image_resizes_shorter_side_and_centre_crops(tmp_path: Path) -> None:
    # 150x50: red, green, blue thirds. Shorter side to 64 -> 192x64; the centre is green.
    stripes = np.zeros((50, 150, 3), dtype=np.uint8)
    stripes[:, :50, 0] = 255
    stripes[:, 50:100, 1] = 255
    stripes[:, 100:, 2] = 255
    Image.fromarray(stripes).save(tmp_path / "stripes.png")

    image = load_image(tmp_path / "stripes.png")
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert (image[:, :, 1] > 200).all()
    assert (image[:, :, 0] < 60).all() and (image[:, :, 2] < 60).all()


def test_save_image_grid_layout_and_values(tmp_path: Path) -> None:
    images = torch.stack([torch.full((3, 4, 4), v) for v in (-1.0, 0.0, 1.0)])
    path = save_image_grid(images, tmp_path / "grid.png", columns=2, pad=2)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * (4 + 2) + 2, 2 * (4 + 2) + 2, 3)
    assert (grid[2:6, 2:6] == 0).all()
    assert (grid[2:6, 8:12] == 128).all()
    assert (grid[8:12, 2:6] == 255).all()

    with pytest.raises(ValueError, match=r"\[N, 1\|3, H, W\]"):
        save_image_grid(torch.zeros(3, 4, 4), tmp_path / "bad.png")


def write_image_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    (root / "nested").mkdir(parents=True)
    sizes = [(64, 64), (80, 100), (120, 70), (64, 90), (200, 200), (70, 70)]
    for index, (h, w) in enumerate(sizes):
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        folder = root / "nested" if index % 2 else root
        suffix = ".jpg" if index % 3 == 0 else ".png"
        Image.fromarray(pixels).save(folder / f"face_{index}{suffix}")
    (root / "notes.txt").write_text("not an image")


def test_load_image_folder(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "images")
    images = load_image_folder(tmp_path / "images")
    assert images.shape == (6, 3, 64, 64) and images.dtype == torch.uint8

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "missing")


def test_train_dcgan_writes_samples_and_checkpoint(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "images")
    out = tmp_path / "run"
    result = train_dcgan(
        tmp_path / "images",
        out,
        steps=4,
        batch_size=4,
        k_disc=2,
        device="cpu",
        seed=0,
        sample_every=2,
        config=TINY,
        progress=False,
    )

    assert result.steps == 4
    assert result.samples == [out / "samples/step_000002.png", out / "samples/step_000004.png"]
    for path in result.samples:
        with Image.open(path) as grid:
            assert grid.size == (8 * 66 + 2, 8 * 66 + 2)
    assert {"loss/D/real", "loss/D/fake", "loss/G/adv"} <= set(result.stats)
    assert all(math.isfinite(v) for v in result.stats.values())
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    generator = load_dcgan_generator(result.checkpoint)
    assert generator.config == TINY
    with torch.no_grad():
        assert generator(torch.randn(2, TINY.latent_dim)).shape == (2, 3, 64, 64)

    with pytest.raises(ValueError, match="k_disc must be >= 1, got 0"):
        train_dcgan(tmp_path / "images", out, steps=1, k_disc=0, progress=False)
