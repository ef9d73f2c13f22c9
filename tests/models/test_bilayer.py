"""The model's two verbs: register avatars, render them in poses, batched over avatars."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.bilayer import AvatarState, BilayerModel, mask_background
from models.config import get_config
from models.layers import bilinear_sample_adjoint
from tests.models import tiny_config

torch.set_num_threads(min(2, torch.get_num_threads()))

CFG = get_config("small")
S = CFG.image_size


def _sources(batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Distinct random source frames: image, stickman, pose, mask."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, S, S, generator=generator) * 2 - 1
    stickman = torch.rand(batch, 3, S, S, generator=generator) * 2 - 1
    pose = torch.rand(batch, 136, generator=generator) * 2 - 1
    mask = (torch.rand(batch, 1, S, S, generator=generator) > 0.3).float()
    return image, stickman, pose, mask


@pytest.fixture(scope="module")
def model() -> BilayerModel:
    torch.manual_seed(0)
    return BilayerModel(CFG, spectral_norm=False).eval()


@pytest.fixture(scope="module")
def avatars(model: BilayerModel) -> tuple[AvatarState, tuple[torch.Tensor, ...]]:
    sources = _sources(3, seed=1)
    with torch.no_grad():
        state = model.register(*sources, enhance=True)
    return state, sources


def _row(state: AvatarState, index: int) -> AvatarState:
    return AvatarState(state.texture[index : index + 1], state.params[index : index + 1])


def test_register_returns_one_state_per_avatar(
    model: BilayerModel, avatars: tuple[AvatarState, tuple[torch.Tensor, ...]]
) -> None:
    state, (image, stickman, pose, mask) = avatars
    assert state.texture.shape == (3, 3, S, S)
    assert state.params.shape == (3, model.param_count)
    assert torch.isfinite(state.texture).all() and torch.isfinite(state.params).all()

    # registration of a batch equals registering each avatar alone
    with torch.no_grad():
        alone = model.register(image[1:2], stickman[1:2], pose[1:2], mask[1:2], enhance=True)
    torch.testing.assert_close(alone.texture, state.texture[1:2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone.params, state.params[1:2], rtol=1e-4, atol=1e-5)

    # the Enhancer changes the texture
    with torch.no_grad():
        plain = model.register(image[1:2], stickman[1:2], pose[1:2], mask[1:2], enhance=False)
    assert (plain.texture - state.texture[1:2]).abs().max() > 1e-3


def test_a_batch_may_mix_avatars(
    model: BilayerModel, avatars: tuple[AvatarState, tuple[torch.Tensor, ...]]
) -> None:
    state, _ = avatars
    poses = _sources(4, seed=2)[2]

    # rows: avatars 2, 0, 1, 2 in four different poses
    order = torch.tensor([2, 0, 1, 2])
    mixed = AvatarState(state.texture[order], state.params[order])
    with torch.no_grad():
        batch = model.render(mixed, poses)

    for row, avatar in enumerate(order.tolist()):
        with torch.no_grad():
            alone = model.render(_row(state, avatar), poses[row : row + 1])
        torch.testing.assert_close(batch.frame[row : row + 1], alone.frame, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batch.uv[row : row + 1], alone.uv, rtol=1e-4, atol=1e-5)

    # the same pose on different avatars gives different frames
    same_pose = poses[:1].expand(3, -1)
    with torch.no_grad():
        frames = model.render(state, same_pose).frame
    assert (frames[0] - frames[1]).abs().mean() > 1e-3
    assert (frames[1] - frames[2]).abs().mean() > 1e-3


def test_render_outputs_compose_as_documented(
    model: BilayerModel, avatars: tuple[AvatarState, tuple[torch.Tensor, ...]]
) -> None:
    state, _ = avatars
    poses = _sources(3, seed=3)[2]
    with torch.no_grad():
        out = model.render(state, poses)

    assert out.frame.shape == out.lf.shape == out.warped.shape == (3, 3, S, S)
    assert out.uv.shape == (3, S, S, 2)
    assert out.mask_logit.shape == out.mask.shape == (3, 1, S, S)
    assert ((out.mask >= 0) & (out.mask <= 1)).all()
    assert out.lf.abs().max() < 1

    torch.testing.assert_close(out.mask, torch.sigmoid(out.mask_logit))
    torch.testing.assert_close(out.frame, mask_background(out.lf + out.warped, out.mask))
    # uv = identity grid + tanh(delta): within one unit of the identity grid
    assert (out.uv - model.identity_grid).abs().max() < 1


def test_register_without_a_mask(model: BilayerModel) -> None:
    image, stickman, pose, _ = _sources(1, seed=4)
    with torch.no_grad():
        state = model.register(image, stickman, pose, None, enhance=True)
        frame = model.render(state, pose).frame
    assert torch.isfinite(frame).all()


def test_several_sources_average_their_embeddings(model: BilayerModel) -> None:
    image, stickman, pose, mask = _sources(4, seed=8)
    # two avatars with two source frames each: [B=2, N=2, ...]
    stacked = [x.reshape(2, 2, *x.shape[1:]) for x in (image, stickman, pose, mask)]
    with torch.no_grad():
        together = model.embed(stacked[0], stacked[1], stacked[3])
        apart = model.embed(image, stickman, mask)
        state = model.register(*stacked, enhance=False)
        expected = model.inference_projector(together)

    for joint, single in zip(together, apart, strict=True):
        mean = single.reshape(2, 2, *single.shape[1:]).mean(dim=1)
        torch.testing.assert_close(joint, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state.params, expected)


def test_bad_inputs_name_expected_and_received(model: BilayerModel) -> None:
    image, stickman, pose, mask = _sources(1, seed=5)
    expected = r"image: expected \[B, 3, 128, 128\] or .*, received \[1, 3, 64, 128\]"
    with pytest.raises(ValueError, match=expected):
        model.register(image[:, :, :64], stickman, pose, mask)
    state = AvatarState(torch.zeros(1, 3, S, S), torch.zeros(1, model.param_count))
    with pytest.raises(ValueError, match=r"poses: expected \[B, 136\], received \[1, 68\]"):
        model.render(state, pose[:, :68])
    with pytest.raises(ValueError, match="params: expected"):
        model.render(AvatarState(state.texture, torch.zeros(1, 7)), pose)


def test_training_pass_reaches_every_generator_parameter() -> None:
    cfg = tiny_config()
    size = cfg.image_size
    torch.manual_seed(6)
    model = BilayerModel(cfg, spectral_norm=True).train()
    image, stickman, pose, mask = (
        torch.nn.functional.interpolate(x, size=size) if x.dim() == 4 else x
        for x in _sources(2, seed=6)
    )

    out = model(image, stickman, pose, pose.flip(0), mask, enhance=True)
    assert out.target.frame.shape == out.frame_lf_detached.shape == (2, 3, size, size)
    assert len(out.embeddings) == 6

    loss = out.target.frame.square().mean() + out.target.mask_logit.square().mean()
    loss = loss + out.frame_lf_detached.abs().mean() + out.target.lf.abs().mean()
    loss.backward()

    missing = [
        name
        for name, parameter in model.named_parameters()
        if parameter.grad is None or not torch.isfinite(parameter.grad).all()
    ]
    assert missing == []
    # the frame's mask is detached: the mask logits get no gradient through the frame
    assert out.target.frame.requires_grad and not out.target.mask.detach().requires_grad


def test_adjoint_exports_to_onnx_and_matches(tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")

    class Adjoint(torch.nn.Module):
        def forward(self, values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
            return bilinear_sample_adjoint(values, grid, (16, 16), CFG.align_corners)

    torch.manual_seed(7)
    values = torch.randn(2, 3, 12, 12)
    grid = torch.rand(2, 12, 12, 2) * 2.2 - 1.1
    path = tmp_path / "adjoint.onnx"
    torch.onnx.export(
        Adjoint(),
        (values, grid),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["values", "grid"],
        output_names=["texture"],
    )

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (result,) = session.run(None, {"values": values.numpy(), "grid": grid.numpy()})
    expected = Adjoint()(values, grid).numpy()
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)
    ops = {node.op_type for node in __import__("onnx").load(str(path)).graph.node}
    assert "ScatterElements" in ops
