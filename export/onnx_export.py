"""ONNX export of the two graphs the server runs.

Registration graph (`register.onnx`, batch 1):
    image [1,3,S,S], stickman [1,3,S,S], pose [1,136], mask [1,1,S,S]
      -> texture [1,3,S,S], params [1,P]
Per-frame graph (`frame.onnx`, dynamic batch B; rows may belong to different avatars):
    pose [B,136], texture [B,3,S,S], params [B,P]
      -> frame uint8 [B,S,S,3], mask uint8 [B,S,S]

Batch norm is folded everywhere. The Inference Generator's first norm (plain batch norm
on the keypoint MLP output) becomes one constant per-channel affine (it cannot go into the
MLP's last layer: the block's skip conv reads the un-normalised features). Every adaptive
norm (batch norm without affine, then the avatar's per-channel scale and bias) is folded
into the avatar's parameters at registration:

    scale' = scale / sqrt(running_var + eps)
    bias'  = bias - running_mean * scale'

so the per-frame graph applies a single `x * scale' + bias'` and carries no statistics.
`params` therefore has the layout of `BilayerModel.param_layout()` with folded values;
`FrameGraph` and `RegisterGraph` below are the PyTorch modules that are exported, and the
PyTorch runtime runs them too, so every runtime shares one parameter convention.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.bilayer import BilayerModel
from models.config import NUM_GENERATOR_BLOCKS, POSE_SIZE
from models.layers import AdaptiveBatchNorm, bilinear_sample, identity_grid
from models.networks import InferenceBlock, ParamLayout

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
FRAME_INPUT_NAMES = ["pose", "texture", "params"]
FRAME_OUTPUT_NAMES = ["frame", "mask"]
REGISTER_INPUT_NAMES = ["image", "stickman", "pose", "mask"]
REGISTER_OUTPUT_NAMES = ["texture", "params"]


def frame_param_layout(model: BilayerModel) -> ParamLayout:
    """Layout of the folded `params` input (same names and shapes as the model's)."""
    return model.param_layout()


def _bn_affine(norm: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Eval-mode batch norm as y = x * a + c; returns (a, c), each [C]."""
    if norm.running_var is None or norm.running_mean is None:
        raise ValueError("batch norm without running statistics cannot be folded")
    a = torch.rsqrt(norm.running_var + norm.eps)
    c = -norm.running_mean * a
    if norm.affine:
        a, c = a * norm.weight, c * norm.weight + norm.bias
    return a.detach(), c.detach()


def _adaptive_norms(model: BilayerModel) -> dict[str, nn.BatchNorm2d]:
    """Layout owner name ("blocks.3.norm1", "final_norm") -> its batch norm."""
    generator = model.inference_generator
    norms: dict[str, nn.BatchNorm2d] = {}
    for j, block in enumerate(generator.blocks):
        for name in ("norm1", "norm2"):
            module = getattr(block, name)
            if isinstance(module, AdaptiveBatchNorm):
                norms[f"blocks.{j}.{name}"] = module.norm
    norms["final_norm"] = generator.final_norm.norm
    return norms


class ParamFolder(nn.Module):
    """Folds the adaptive norms' running statistics into raw avatar params [B, P]."""

    gain: Tensor
    mean: Tensor
    scale_source: Tensor

    def __init__(self, model: BilayerModel) -> None:
        super().__init__()
        self.layout = frame_param_layout(model)
        norms = _adaptive_norms(model)
        gain = torch.ones(sum(math.prod(shape) for _, shape in self.layout))
        mean = torch.zeros_like(gain)

        # per flat position: the 1/std that multiplies a scale, and the mean a bias pays
        offset = 0
        self.pairs: list[tuple[int, int, int]] = []  # (scale offset, bias offset, channels)
        offsets = {}
        for name, shape in self.layout:
            offsets[name] = offset
            offset += math.prod(shape)
        for owner, norm in norms.items():
            channels = norm.num_features
            if norm.running_mean is None or norm.running_var is None:
                raise ValueError(f"{owner}: batch norm without running statistics")
            start = offsets[f"{owner}.scale"]
            gain[start : start + channels] = torch.rsqrt(norm.running_var + norm.eps)
            bias_start = offsets[f"{owner}.bias"]
            mean[bias_start : bias_start + channels] = norm.running_mean
            self.pairs.append((start, bias_start, channels))

        self.register_buffer("gain", gain[None])  # [1, P]
        self.register_buffer("mean", mean[None])  # [1, P]
        # where each bias position finds its (already folded) scale, identity elsewhere
        source = torch.arange(gain.numel())
        for start, bias_start, channels in self.pairs:
            source[bias_start : bias_start + channels] = torch.arange(start, start + channels)
        self.register_buffer("scale_source", source)  # [P]

    def forward(self, params: Tensor) -> Tensor:
        scaled = params * self.gain  # [B, P]: scales now include 1/std
        # bias' = bias - mean * scale'; `mean` is zero outside bias positions
        return scaled - self.mean * scaled[:, self.scale_source]  # [B, P]


def _split(params: Tensor, layout: ParamLayout) -> dict[str, Tensor]:
    named = {}
    offset = 0
    for name, shape in layout:
        size = math.prod(shape)
        named[name] = params[:, offset : offset + size].reshape(-1, *shape)
        offset += size
    return named


class FrameGraph(nn.Module):
    """The stateless per-frame network with folded parameters and uint8 outputs.

    Runs the networks in the dtype of its weights (FP32, or BF16 for the PyTorch
    runtime) and the composition (grid, warp, uint8 conversion) in FP32.
    """

    first_scale: Tensor
    first_bias: Tensor
    identity_grid: Tensor
    head: nn.Conv2d

    def __init__(self, model: BilayerModel, upsample_mode: str = "phases") -> None:
        super().__init__()
        if upsample_mode not in ("phases", "resize"):
            raise ValueError(f"upsample_mode: expected 'phases' or 'resize', got {upsample_mode!r}")
        cfg = model.cfg
        self.image_size = cfg.image_size
        self.align_corners = cfg.align_corners
        self.negative_slope = cfg.negative_slope
        self.layout = frame_param_layout(model)
        self.param_count = sum(math.prod(shape) for _, shape in self.layout)

        # keypoint MLP; the first block's plain batch norm as one constant affine
        mlp = copy.deepcopy(model.keypoint_mlp)
        self.mlp = nn.ModuleList(mlp.layers)
        self.base_channels = mlp.out_channels
        self.base_size = mlp.size
        first_norm = model.inference_generator.blocks[0].norm1
        if not isinstance(first_norm, nn.BatchNorm2d):
            raise TypeError(f"first norm: expected BatchNorm2d, got {type(first_norm).__name__}")
        a, c = _bn_affine(first_norm)
        self.register_buffer("first_scale", a[None, :, None, None].clone())  # [1, C0, 1, 1]
        self.register_buffer("first_bias", c[None, :, None, None].clone())  # [1, C0, 1, 1]

        # the generator's convolutions (the norms live in the params now)
        generator = model.inference_generator
        blocks = [block for block in generator.blocks if isinstance(block, InferenceBlock)]
        self.conv1 = nn.ModuleList(copy.deepcopy(block.conv1) for block in blocks)
        self.conv2 = nn.ModuleList(copy.deepcopy(block.conv2) for block in blocks)
        self.head = copy.deepcopy(generator.head)
        grid = identity_grid(cfg.image_size, cfg.align_corners)
        self.register_buffer("identity_grid", grid)  # [1, S, S, 2]

        # nearest x2 then conv2 == four 2x2 convs on the low-resolution input, one per
        # output phase (a, b), interleaved: 16/36 of the multiply-adds
        self.upsample_mode = upsample_mode
        self.conv2_phases = nn.ModuleList(
            _phase_convs(cast(nn.Conv2d, conv)) for conv in self.conv2
        )

    def set_network_dtype(self, dtype: torch.dtype) -> FrameGraph:
        """Run the networks in `dtype` (e.g. BF16); the head, the grid and the warp stay FP32.

        The head stays in FP32 because its Δuv output steers the warp: BF16's 8-bit
        mantissa would round offsets near 1 by ~0.004, half a pixel at 256 px.
        """
        for module in (self.mlp, self.conv1, self.conv2, self.conv2_phases):
            module.to(dtype)
        self.first_scale = self.first_scale.to(dtype)
        self.first_bias = self.first_bias.to(dtype)
        return self

    def network(self, pose: Tensor, params: Tensor) -> Tensor:
        """Pose and folded params -> the 6 head channels [B, 6, S, S]."""
        slope = self.negative_slope
        p = _split(params, self.layout)

        x = pose
        for i, layer in enumerate(self.mlp):
            x = layer(x)
            if i < len(self.mlp) - 1:
                x = F.leaky_relu(x, slope)
        x = x.reshape(-1, self.base_channels, self.base_size, self.base_size)  # [B, C0, b, b]

        for j in range(NUM_GENERATOR_BLOCKS):
            name = f"blocks.{j}"
            if j == 0:
                h = x * self.first_scale + self.first_bias
            else:
                h = x * p[f"{name}.norm1.scale"][:, :, None, None] + p[f"{name}.norm1.bias"][
                    :, :, None, None
                ]
            h = self.conv1[j](F.leaky_relu(h, slope))  # [B, Cout, s, s]
            h = h * p[f"{name}.norm2.scale"][:, :, None, None] + p[f"{name}.norm2.bias"][
                :, :, None, None
            ]
            h = F.leaky_relu(h, slope)
            size = self.base_size * 2**j
            skip = _skip_conv(x, p[f"{name}.skip.weight"], p[f"{name}.skip.bias"], size)
            if self.upsample_mode == "phases":
                phases = cast(nn.ModuleList, self.conv2_phases[j])
                x = _upsample_conv(h, phases, skip)  # [B, Cout, 2s, 2s]
            else:
                h = self.conv2[j](F.interpolate(h, scale_factor=2.0, mode="nearest"))
                x = h + F.interpolate(skip, scale_factor=2.0, mode="nearest")

        x = x * p["final_norm.scale"][:, :, None, None] + p["final_norm.bias"][:, :, None, None]
        x = F.leaky_relu(x, slope).to(self.head.weight.dtype)
        return self.head(x)  # [B, 6, S, S]

    def forward(self, pose: Tensor, texture: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        dtype = cast(nn.Conv2d, self.conv1[0]).weight.dtype
        out = self.network(pose.to(dtype), params.to(dtype)).float()  # [B, 6, S, S]
        if out.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous()

        # composition in FP32: warp the texture, add the LF layer, mask the background
        delta_uv = torch.tanh(out[:, 0:2])  # [B, 2, S, S]
        lf = torch.tanh(out[:, 2:5])  # [B, 3, S, S]
        mask = torch.sigmoid(out[:, 5:6])  # [B, 1, S, S]
        uv = self.identity_grid + delta_uv.permute(0, 2, 3, 1)  # [B, S, S, 2]
        warped = bilinear_sample(texture.float(), uv, self.align_corners)  # [B, 3, S, S]

        # frame in [-1, 1] is (lf + warped + 1) * mask - 1; uint8 is (frame + 1) * 127.5
        frame = torch.round((lf + warped + 1.0) * (mask * 127.5)).clamp(0.0, 255.0)
        frame = frame.to(torch.uint8).permute(0, 2, 3, 1)  # [B, S, S, 3]
        mask_u8 = torch.round(mask[:, 0] * 255.0).to(torch.uint8)  # [B, S, S]
        return frame, mask_u8


# For output row phase a, the three 3x3 taps over the upsampled rows land on two source
# rows: a = 0 reads rows (i-1, i) with taps (0, 1+2); a = 1 reads (i, i+1) with (0+1, 2).
_PHASE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
_PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))


def _phase_convs(conv: nn.Conv2d) -> nn.ModuleList:
    """The four 2x2 convs (a, b) equal to `conv` (3x3, pad 1) after nearest x2 upsampling."""
    phases = nn.ModuleList()
    for a, b in _PHASES:
        kernel = torch.einsum(
            "pk,oikl,ql->oipq", _PHASE_TAPS[a], conv.weight.detach(), _PHASE_TAPS[b]
        )  # [Cout, Cin, 2, 2]
        phase = nn.Conv2d(conv.in_channels, conv.out_channels, 2, bias=conv.bias is not None)
        with torch.no_grad():
            phase.weight.copy_(kernel)
            if conv.bias is not None and phase.bias is not None:
                phase.bias.copy_(conv.bias)
        phases.append(phase)
    return phases


def _upsample_conv(h: Tensor, phases: nn.ModuleList, skip: Tensor) -> Tensor:
    """conv(upsample_nearest_x2(h)) + upsample_nearest_x2(skip), computed per phase."""
    channels, size = skip.shape[1], skip.shape[2]
    outputs = []
    for (a, b), conv in zip(_PHASES, phases, strict=True):
        padded = F.pad(h, (1 - b, b, 1 - a, a))  # (left, right, top, bottom)
        outputs.append(conv(padded) + skip)  # [B, Cout, s, s]
    stacked = torch.stack(outputs, dim=2)  # [B, Cout, 4, s, s]
    return F.pixel_shuffle(stacked.reshape(-1, 4 * channels, size, size), 2)  # [B, Cout, 2s, 2s]


def _skip_conv(x: Tensor, weight: Tensor, bias: Tensor, size: int) -> Tensor:
    """Per-avatar 1x1 conv: x [B, Cin, s, s], weight [B, Cout, Cin], bias [B, Cout]."""
    channels, out_channels = weight.shape[2], weight.shape[1]
    out = torch.bmm(weight, x.reshape(-1, channels, size * size))  # [B, Cout, s*s]
    return out.reshape(-1, out_channels, size, size) + bias[:, :, None, None]


class SpecialisedFrameGraph(nn.Module):
    """The per-frame graph of one avatar: texture and params baked in as constants.

    Used to measure what statelessness costs on a CPU (ONNX Runtime then folds the
    avatar's scales into the convolutions).
    """

    texture: Tensor
    params: Tensor

    def __init__(self, frame_graph: FrameGraph, texture: Tensor, params: Tensor) -> None:
        super().__init__()
        self.frame_graph = frame_graph
        self.register_buffer("texture", texture.detach().clone())  # [1, 3, S, S]
        self.register_buffer("params", params.detach().clone())  # [1, P]

    def forward(self, pose: Tensor) -> tuple[Tensor, Tensor]:
        batch = pose.shape[0]
        texture = self.texture.expand(batch, -1, -1, -1)
        params = self.params.expand(batch, -1)
        return self.frame_graph(pose, texture, params)


class RegisterGraph(nn.Module):
    """Source frame -> texture and folded avatar params (Enhancer included by default)."""

    def __init__(self, model: BilayerModel, enhance: bool = True) -> None:
        super().__init__()
        self.model = model
        self.enhance = enhance
        self.fold = ParamFolder(model)

    def forward(
        self, image: Tensor, stickman: Tensor, pose: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        state = self.model.register(image, stickman, pose, mask, enhance=self.enhance)
        return state.texture, self.fold(state.params)  # [B, 3, S, S], [B, P]


def _check(path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def _declare_outputs(path: Path, shapes: dict[str, list[int | str]]) -> None:
    """Write the outputs' full shapes into the graph.

    The tracer loses the static sizes behind reshapes with a -1 batch, so the outputs
    would read [batch, ?, ?, 3]; the sizes are known, and runtimes and tests read them.
    """
    import onnx

    model = onnx.load(str(path))
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        for dim, value in zip(dims, shapes[output.name], strict=True):
            if isinstance(value, int):
                dim.dim_value = value
            else:
                dim.dim_param = value
    onnx.save(model, str(path))


def _restore_inputs(path: Path, example: dict[str, Tensor]) -> None:
    """Declare inputs the tracer dropped because the graph does not read them.

    Without the Enhancer the registration graph never reads `pose` (only the Enhancer's
    source render needs it); the input stays declared so that every registration graph
    has the same contract.
    """
    import onnx

    model = onnx.load(str(path))
    present = [value.name for value in model.graph.input]
    if present == list(example):
        return
    inputs = []
    for name, tensor in example.items():
        found = [value for value in model.graph.input if value.name == name]
        inputs.append(found[0] if found else onnx.helper.make_tensor_value_info(
            name, onnx.TensorProto.FLOAT, list(tensor.shape)
        ))
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    onnx.save(model, str(path))
    logger.info("%s: declared unused input(s) %s", path, sorted(set(example) - set(present)))


def export_frame_graph(
    model: BilayerModel, cfg: Any, path: Path, *, opset: int = DEFAULT_OPSET
) -> Path:
    """Write the per-frame graph (dynamic batch) and check it with onnx.checker."""
    if opset < 16:
        raise ValueError(f"opset: GridSample needs opset 16 or later, got {opset}")
    graph = FrameGraph(model.eval()).eval()
    size = cfg.image_size
    example = (
        torch.zeros(2, POSE_SIZE),
        torch.zeros(2, 3, size, size),
        torch.zeros(2, graph.param_count),
    )
    batch_axes = {name: {0: "batch"} for name in FRAME_INPUT_NAMES + FRAME_OUTPUT_NAMES}
    with torch.no_grad():
        torch.onnx.export(
            graph,
            example,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=FRAME_INPUT_NAMES,
            output_names=FRAME_OUTPUT_NAMES,
            dynamic_axes=batch_axes,
            do_constant_folding=True,
        )
    _declare_outputs(path, {"frame": ["batch", size, size, 3], "mask": ["batch", size, size]})
    _check(path)
    logger.info("per-frame graph written to %s", path)
    return Path(path)


def export_specialised_frame_graph(
    frame_graph: FrameGraph, texture: Tensor, params: Tensor, path: Path, *, opset: int = 17
) -> Path:
    """Write the per-frame graph of one avatar (input: pose only; dynamic batch)."""
    graph = SpecialisedFrameGraph(frame_graph, texture, params).eval()
    size = frame_graph.image_size
    with torch.no_grad():
        torch.onnx.export(
            graph,
            (torch.zeros(1, POSE_SIZE),),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["pose"],
            output_names=FRAME_OUTPUT_NAMES,
            dynamic_axes={name: {0: "batch"} for name in ["pose", *FRAME_OUTPUT_NAMES]},
            do_constant_folding=True,
        )
    _declare_outputs(path, {"frame": ["batch", size, size, 3], "mask": ["batch", size, size]})
    _check(path)
    return Path(path)


def export_register_graph(
    model: BilayerModel,
    cfg: Any,
    path: Path,
    *,
    opset: int = DEFAULT_OPSET,
    enhance: bool = True,
) -> Path:
    """Write the registration graph (batch 1) and check it with onnx.checker."""
    if opset < 16:
        raise ValueError(f"opset: GridSample and ScatterElements(add) need 16+, got {opset}")
    graph = RegisterGraph(model.eval(), enhance=enhance).eval()
    size = cfg.image_size
    example = (
        torch.zeros(1, 3, size, size),
        torch.zeros(1, 3, size, size),
        torch.zeros(1, POSE_SIZE),
        torch.ones(1, 1, size, size),
    )
    with torch.no_grad():
        torch.onnx.export(
            graph,
            example,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=REGISTER_INPUT_NAMES,
            output_names=REGISTER_OUTPUT_NAMES,
            do_constant_folding=True,
        )
    _restore_inputs(path, dict(zip(REGISTER_INPUT_NAMES, example, strict=True)))
    _check(path)
    logger.info("registration graph written to %s (enhancer: %s)", path, enhance)
    return Path(path)
