"""Shapes and exact properties of the bi-layer networks and layers.

The small preset runs on real CPU tensors; the paper preset's shape tests run on the
meta device (the real module code, shapes only, no arithmetic) to stay fast.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from models.bilayer import BilayerModel, load_bilayer, remove_spectral_norm
from models.config import ModelConfig, get_config
from models.layers import (
    AdaptiveSpadeBatchNorm,
    adaptive_conv1x1,
    bilinear_sample,
    bilinear_sample_adjoint,
    has_spectral_norm,
    identity_grid,
)
from models.networks import Discriminator, split_params
from tests.models import tiny_config

torch.set_num_threads(min(2, torch.get_num_threads()))


def test_presets_round_trip_through_dict() -> None:
    for preset in ("paper", "small"):
        cfg = get_config(preset)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
        assert cfg.base_size == cfg.image_size // 64

    with pytest.raises(ValueError, match="unknown preset"):
        get_config("huge")
    with pytest.raises(ValueError, match="texture_channels: expected 7 values"):
        dataclasses.replace(get_config("small"), texture_channels=(8, 8))
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({**get_config("small").to_dict(), "depth": 3})


@pytest.mark.parametrize(
    ("preset", "device", "batch"),
    [("small", "cpu", 2), ("paper", "meta", 1)],
    ids=["small", "paper"],
)
def test_every_network_has_the_documented_shapes(preset: str, device: str, batch: int) -> None:
    # one enhancer step has the shapes of four and a quarter of the cost
    cfg = dataclasses.replace(get_config(preset), enhancer_steps=1)
    s, b, e = cfg.image_size, cfg.base_size, cfg.embedding_size
    torch.manual_seed(0)

    with torch.device(device):
        model = BilayerModel(cfg, spectral_norm=False).eval().requires_grad_(False)
        discriminator = Discriminator(cfg).eval().requires_grad_(False)
        image = torch.rand(batch, 3, s, s) * 2 - 1
        stickman = torch.rand(batch, 3, s, s) * 2 - 1
        pose = torch.rand(batch, 136) * 2 - 1
        mask = torch.rand(batch, 1, s, s)

        # Embedder: one embedding per generator block
        embeddings = model.embedder(image, stickman)
        assert [tuple(x.shape) for x in embeddings] == [
            (batch, c, e, e) for c in cfg.embedding_channels
        ]

        # Texture projector + generator
        adaptive = model.texture_projector(embeddings)
        for name, _, rows, columns in model.texture_generator.adaptive_shapes():
            assert tuple(adaptive[name].shape) == (batch, rows, columns)
        texture = model.texture_generator(adaptive)
        assert tuple(texture.shape) == (batch, 3, s, s)

        # Inference projector, Keypoint MLP, Inference Generator
        params = model.inference_projector(embeddings)
        assert tuple(params.shape) == (batch, model.param_count)
        features = model.keypoint_mlp(pose)
        assert tuple(features.shape) == (batch, cfg.inference_channels[0], b, b)
        delta_uv, lf, mask_logit = model.inference_generator(features, params)
        assert tuple(delta_uv.shape) == (batch, 2, s, s)
        assert tuple(lf.shape) == (batch, 3, s, s)
        assert tuple(mask_logit.shape) == (batch, 1, s, s)

        # Texture Enhancer
        grid = model.identity_grid + delta_uv.permute(0, 2, 3, 1)
        enhanced = model.enhancer(texture, grid, lf, mask, image)
        assert tuple(enhanced.shape) == (batch, 3, s, s)

        # Discriminator: patch scores and the features of its 6 blocks
        scores, features_d = discriminator(image, stickman)
        assert tuple(scores.shape) == (batch, 1, s // 32, s // 32)
        widths = (*cfg.discriminator_channels[1:], cfg.discriminator_channels[-1])
        sizes = (s // 2, s // 4, s // 8, s // 16, s // 32, s // 32)
        assert [tuple(f.shape) for f in features_d] == [
            (batch, c, r, r) for c, r in zip(widths, sizes, strict=True)
        ]

    if device == "cpu":
        for tensor in (texture, params, delta_uv, lf, enhanced, scores):
            assert torch.isfinite(tensor).all()
        assert texture.abs().max() <= 1.0
        # different sources give different avatars
        assert not torch.allclose(params[0], params[1])


def test_paper_preset_has_the_released_sizes() -> None:
    with torch.device("meta"):
        model = BilayerModel(get_config("paper"), spectral_norm=False)

    assert model.param_count == 244_576
    frame = sum(p.numel() for p in model.keypoint_mlp.parameters())
    frame += sum(p.numel() for p in model.inference_generator.parameters())
    assert abs(frame - 5.34e6) / 5.34e6 < 0.005

    layout = model.param_layout()
    names = [name for name, _ in layout]
    assert len(names) == len(set(names))
    assert layout[0] == ("blocks.0.norm2.scale", (256,))
    assert layout[-1] == ("final_norm.bias", (32,))


def test_split_params_rejects_a_wrong_size() -> None:
    layout = [("a", (2, 3)), ("b", (4,))]
    named = split_params(torch.arange(20.0).reshape(2, 10), layout)
    assert named["a"].shape == (2, 2, 3)
    assert named["b"][1].tolist() == [16.0, 17.0, 18.0, 19.0]
    with pytest.raises(ValueError, match="expected 10 values per avatar, received 9"):
        split_params(torch.zeros(2, 9), layout)


# ----------------------------------------------------------------------------------------
# Layers


@pytest.mark.parametrize("align_corners", [False, True])
def test_bilinear_adjoint_equals_autograd(align_corners: bool) -> None:
    torch.manual_seed(1)
    texture = torch.randn(2, 3, 9, 11, dtype=torch.float64, requires_grad=True)
    # points inside, on the border and outside the texture
    grid = torch.rand(2, 7, 5, 2, dtype=torch.float64) * 2.6 - 1.3
    grid[0, 0, 0] = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    values = torch.randn(2, 3, 7, 5, dtype=torch.float64)

    (bilinear_sample(texture, grid, align_corners) * values).sum().backward()
    adjoint = bilinear_sample_adjoint(values, grid, (9, 11), align_corners)

    assert texture.grad is not None
    torch.testing.assert_close(adjoint, texture.grad, rtol=0, atol=1e-12)


def test_enhancer_gradient_equals_autograd_of_the_masked_error() -> None:
    cfg = dataclasses.replace(get_config("small"), enhancer_steps=1)
    model = BilayerModel(cfg, spectral_norm=False).double()
    s = cfg.image_size
    torch.manual_seed(2)

    texture = torch.rand(2, 3, s, s, dtype=torch.float64, requires_grad=True)
    grid = model.identity_grid.double() + 0.05 * torch.randn(2, s, s, 2, dtype=torch.float64)
    lf = torch.rand(2, 3, s, s, dtype=torch.float64)
    mask = torch.rand(2, 1, s, s, dtype=torch.float64)
    source = torch.rand(2, 3, s, s, dtype=torch.float64)

    predicted = mask * (lf + bilinear_sample(texture, grid, cfg.align_corners))
    loss = ((predicted - mask * source) ** 2).sum()
    (expected,) = torch.autograd.grad(loss, texture)

    closed_form = model.enhancer.data_gradient(texture.detach(), grid, lf, mask, source)
    torch.testing.assert_close(closed_form, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("align_corners", [False, True])
def test_identity_grid_reproduces_the_image(align_corners: bool) -> None:
    image = torch.randn(2, 3, 16, 16)
    grid = identity_grid(16, align_corners).expand(2, -1, -1, -1)
    torch.testing.assert_close(bilinear_sample(image, grid, align_corners), image)


def test_adaptive_conv1x1_matches_a_conv_per_sample() -> None:
    torch.manual_seed(3)
    x = torch.randn(3, 5, 4, 6)
    weight = torch.randn(3, 7, 5)
    bias = torch.randn(3, 7)

    out = adaptive_conv1x1(x, weight, bias)
    for i in range(3):
        expected = F.conv2d(x[i : i + 1], weight[i, :, :, None, None], bias[i])
        torch.testing.assert_close(out[i : i + 1], expected)


def test_spade_norm_modulates_per_pixel_and_per_avatar() -> None:
    torch.manual_seed(4)
    norm = AdaptiveSpadeBatchNorm(4, 8, eps=1e-4).eval()
    conv_scale = torch.randn(2, 4, 5)
    conv_bias = torch.randn(2, 4, 5)

    scale, bias = norm.modulation(conv_scale, conv_bias)
    features = norm.pixel_features[0]  # [4, 8, 8]
    expected = 1.0 + torch.einsum("oc,chw->ohw", conv_scale[1, :, :4], features)
    expected = expected + conv_scale[1, :, 4, None, None]
    torch.testing.assert_close(scale[1], expected)
    assert bias.shape == (2, 4, 8, 8)

    # the maps vary over pixels
    assert scale[0].std(dim=(1, 2)).min() > 0


# ----------------------------------------------------------------------------------------
# Spectral norm


def test_removing_spectral_norm_keeps_eval_outputs() -> None:
    cfg = tiny_config()
    s = cfg.image_size
    torch.manual_seed(5)
    model = BilayerModel(cfg, spectral_norm=True)
    assert has_spectral_norm(model)

    image = torch.rand(2, 3, s, s) * 2 - 1
    stickman = torch.rand(2, 3, s, s) * 2 - 1
    pose = torch.rand(2, 136) * 2 - 1

    # a training-mode pass moves the power-iteration vectors and BN statistics
    with torch.no_grad():
        model(image, stickman, pose, pose.flip(0))

    model.eval()
    with torch.no_grad():
        state = model.register(image, stickman, pose, enhance=False)
        before = model.render(state, pose.flip(0)).frame
    checkpoint = {key: value.clone() for key, value in model.state_dict().items()}

    remove_spectral_norm(model)
    assert not has_spectral_norm(model)
    assert not any("parametrizations" in key for key in model.state_dict())
    with torch.no_grad():
        state = model.register(image, stickman, pose, enhance=False)
        after = model.render(state, pose.flip(0)).frame
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)

    # a spectral-norm checkpoint loads into a plain eval model with the same outputs
    loaded = load_bilayer(cfg, checkpoint)
    assert not has_spectral_norm(loaded) and not loaded.training
    with torch.no_grad():
        state = loaded.register(image, stickman, pose, enhance=False)
        again = loaded.render(state, pose.flip(0)).frame
    torch.testing.assert_close(again, before, rtol=1e-4, atol=1e-5)
