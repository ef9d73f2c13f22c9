"""The exported graphs: their contract, the folding rewrites, and parity with PyTorch.

Tolerances (FP32, stated in export/parity.py): registration texture within 2e-3,
params within 1e-4 of their largest value; frames and masks within one uint8 level on
at least 99.9 % of the values and never more than 4 levels apart.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from export.checkpoint import random_generator
from export.onnx_export import (
    FrameGraph,
    RegisterGraph,
    _phase_convs,
    _upsample_conv,
    export_register_graph,
)
from export.parity import (
    LEVEL_SHARE,
    MAX_LEVELS,
    driving_poses,
    frame_parity,
    ort_session,
    random_sources,
    register_parity,
)


def _to_uint8(frame: torch.Tensor) -> np.ndarray:
    """Model frame [B, 3, S, S] in [-1, 1] -> uint8 [B, S, S, 3] as the graph writes it."""
    pixels = torch.round((frame + 1.0) * 127.5).clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------------------------------
# Exact rewrites, in PyTorch


def test_phase_convs_equal_upsample_then_conv() -> None:
    generator = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(5, 7, 3, padding=1)
    h = torch.randn(2, 5, 6, 6, generator=generator)
    skip = torch.randn(2, 7, 6, 6, generator=generator)

    expected = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
    expected = expected + F.interpolate(skip, scale_factor=2.0, mode="nearest")
    got = _upsample_conv(h, _phase_convs(conv), skip)

    assert got.shape == (2, 7, 12, 12)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("upsample_mode", ["phases", "resize"])
def test_folded_graphs_match_the_model(upsample_mode: str) -> None:
    """RegisterGraph (folded params) + FrameGraph == model.register + model.render."""
    model, cfg = random_generator("small", seed=3)
    sources = {k: torch.from_numpy(v) for k, v in random_sources(cfg.image_size, 2, 1).items()}
    poses = torch.from_numpy(driving_poses(sources["pose"][0].numpy(), 2, 5))

    with torch.no_grad():
        state = model.register(sources["image"], sources["stickman"], sources["pose"],
                               sources["mask"])
        expected = model.render(state, poses)
        texture, params = RegisterGraph(model)(
            sources["image"], sources["stickman"], sources["pose"], sources["mask"]
        )
        frame, mask = FrameGraph(model, upsample_mode)(poses, texture, params)

    torch.testing.assert_close(texture, state.texture)
    assert not torch.allclose(params, state.params), "folding should change the params"
    diff = np.abs(frame.numpy().astype(int) - _to_uint8(expected.frame).astype(int))
    assert diff.max() <= 1
    mask_ref = torch.round(expected.mask[:, 0] * 255).to(torch.uint8).numpy()
    assert np.abs(mask.numpy().astype(int) - mask_ref.astype(int)).max() <= 1

    # the frames are not trivial (a saturated or constant image would hide mistakes)
    assert 10 < frame.numpy().std() and 0 < frame.numpy().mean() < 250


def test_frame_graph_rows_are_independent() -> None:
    """A batch mixing avatars renders each row as if it were alone."""
    model, cfg = random_generator("small", seed=4)
    sources = {k: torch.from_numpy(v) for k, v in random_sources(cfg.image_size, 2, 2).items()}
    graph = FrameGraph(model)
    with torch.no_grad():
        texture, params = RegisterGraph(model)(*(sources[k] for k in graph_order()))
        both, _ = graph(sources["pose"], texture, params)
        first, _ = graph(sources["pose"][:1], texture[:1], params[:1])
        second, _ = graph(sources["pose"][1:], texture[1:], params[1:])
    assert np.abs(both[0].numpy().astype(int) - first[0].numpy().astype(int)).max() <= 1
    assert np.abs(both[1].numpy().astype(int) - second[0].numpy().astype(int)).max() <= 1
    assert np.abs(first[0].numpy().astype(int) - second[0].numpy().astype(int)).max() > 10


def graph_order() -> list[str]:
    return ["image", "stickman", "pose", "mask"]


# ------------------------------------------------------------------------------------------
# Graph contract


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param
            for d in value_info.type.tensor_type.shape.dim]


def test_frame_graph_contract(small_bundle) -> None:
    model = onnx.load(str(small_bundle.frame_path))
    onnx.checker.check_model(model, full_check=True)
    size, count = small_bundle.cfg.image_size, small_bundle.manifest.param_count

    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    inputs = {i.name: i for i in model.graph.input}
    outputs = {o.name: o for o in model.graph.output}
    assert list(inputs) == ["pose", "texture", "params"]
    assert list(outputs) == ["frame", "mask"]
    assert _dims(inputs["pose"])[1:] == [136]
    assert _dims(inputs["texture"])[1:] == [3, size, size]
    assert _dims(inputs["params"])[1:] == [count]
    assert _dims(outputs["frame"])[1:] == [size, size, 3]
    assert isinstance(_dims(inputs["pose"])[0], str), "batch must be dynamic"
    assert outputs["frame"].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert outputs["mask"].type.tensor_type.elem_type == onnx.TensorProto.UINT8

    # batch norm folded, the warp as configured
    ops = [node.op_type for node in model.graph.node]
    assert "BatchNormalization" not in ops
    samplers = [node for node in model.graph.node if node.op_type == "GridSample"]
    assert len(samplers) == 1
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in samplers[0].attribute}
    assert attributes["align_corners"] == int(small_bundle.cfg.align_corners)
    assert attributes["mode"] == b"bilinear" and attributes["padding_mode"] == b"zeros"


def test_register_graph_contract(small_bundle) -> None:
    model = onnx.load(str(small_bundle.register_path))
    onnx.checker.check_model(model, full_check=True)
    size = small_bundle.cfg.image_size

    inputs = {i.name: _dims(i) for i in model.graph.input}
    outputs = {o.name: _dims(o) for o in model.graph.output}
    assert inputs == {
        "image": [1, 3, size, size],
        "stickman": [1, 3, size, size],
        "pose": [1, 136],
        "mask": [1, 1, size, size],
    }
    assert outputs == {
        "texture": [1, 3, size, size],
        "params": [1, small_bundle.manifest.param_count],
    }

    # the Enhancer's closed-form gradient: scatter-add, one per corner and step
    scatters = [n for n in model.graph.node if n.op_type == "ScatterElements"]
    assert len(scatters) == 4 * small_bundle.cfg.enhancer_steps
    for node in scatters:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["reduction"] == b"add"


# ------------------------------------------------------------------------------------------
# Parity, small preset


def test_small_register_parity_random(small_bundle) -> None:
    session = ort_session(small_bundle.register_path, threads=2)
    sources = random_sources(small_bundle.cfg.image_size, 2, seed=7)
    row, _, _ = register_parity(small_bundle.model, session, sources, "random")
    assert row.passed, row.figures


def test_small_parity_real_photo(small_bundle, astronaut_128) -> None:
    """The astronaut through the real pose pipeline: register, then drive it."""
    register = ort_session(small_bundle.register_path, threads=2)
    row, texture, params = register_parity(small_bundle.model, register, astronaut_128, "photo")
    assert row.passed, row.figures

    frame = ort_session(small_bundle.frame_path, threads=2)
    poses = driving_poses(astronaut_128["pose"][0], 3, seed=1)
    row = frame_parity(
        small_bundle.model, frame, poses, np.repeat(texture, 3, 0), np.repeat(params, 3, 0),
        "photo",
    )
    assert row.passed, row.figures
    assert row.figures["frame_share_within_1"] >= LEVEL_SHARE
    assert row.figures["frame_max_levels"] <= MAX_LEVELS


@pytest.mark.parametrize("batch", [1, 4])
def test_small_frame_parity_mixed_avatars(small_bundle, batch: int) -> None:
    size = small_bundle.cfg.image_size
    register = RegisterGraph(small_bundle.model).eval()
    sources = random_sources(size, batch, seed=11)
    with torch.no_grad():
        states = [register(*(torch.from_numpy(sources[k][i : i + 1]) for k in graph_order()))
                  for i in range(batch)]
    textures = torch.cat([s[0] for s in states]).numpy()  # every row its own avatar
    params = torch.cat([s[1] for s in states]).numpy()
    poses = driving_poses(sources["pose"][0], batch, seed=2)

    session = ort_session(small_bundle.frame_path, threads=2)
    row = frame_parity(small_bundle.model, session, poses, textures, params, "mixed")
    assert row.passed, row.figures


# ------------------------------------------------------------------------------------------
# Parity, paper preset (batch 1 and 2 only: CPU time)


def _paper_avatars(model, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Avatar states of the paper model without the registration graph (PyTorch)."""
    sources = random_sources(model.cfg.image_size, count, seed=5)
    with torch.no_grad():
        texture, params = RegisterGraph(model, enhance=False)(
            *(torch.from_numpy(sources[k]) for k in graph_order())
        )
    return texture.numpy(), params.numpy()


@pytest.mark.parametrize("batch", [1, 2])
def test_paper_frame_parity(paper_frame, batch: int) -> None:
    textures, params = _paper_avatars(paper_frame.model, 2)
    poses = driving_poses(random_sources(256, 1, seed=9)["pose"][0], batch, seed=4)
    session = ort_session(paper_frame.frame_path, threads=2)
    row = frame_parity(
        paper_frame.model, session, poses, textures[:batch], params[:batch], f"b{batch}"
    )
    assert row.passed, row.figures


@pytest.mark.slow
def test_paper_register_parity(paper_frame, tmp_path) -> None:
    path = export_register_graph(paper_frame.model, paper_frame.cfg, tmp_path / "register.onnx")
    session = ort_session(path, threads=2)
    row, _, _ = register_parity(
        paper_frame.model, session, random_sources(256, 1, seed=3), "random"
    )
    assert row.passed, row.figures


def test_manifest_layout_is_the_models(small_bundle) -> None:
    """The manifest's layout is the model's, and it adds up to the graph's params input."""
    layout = [(name, tuple(shape)) for name, shape in small_bundle.model.param_layout()]
    assert small_bundle.manifest.param_layout == layout
    assert small_bundle.manifest.param_count == small_bundle.model.param_count
