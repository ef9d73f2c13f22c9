"""Static INT8 quantisation of the per-frame graph for ONNX Runtime on CPUs.

QDQ format, per-channel symmetric INT8 weights, UINT8 activations calibrated on real
per-frame inputs (avatars and poses). The output head and everything after it (the warp
and the uint8 conversion) stay in FP32: the head's Δuv channels steer the warp, and a
shared 8-bit scale with the mask logits moves the sampling grid by whole texels.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


class _Feeds:
    """CalibrationDataReader over a list of input dicts."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)

    def rewind(self) -> None:  # the calibrator reads the data once
        return None


def cpu_has_vnni() -> bool:
    """Whether this CPU has 8-bit dot-product instructions (AVX-512 VNNI, AVX-VNNI, AMX)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set(next((line for line in text.splitlines() if line.startswith("flags")), "").split())
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def head_and_tail(model: Any) -> list[str]:
    """Names of the last Conv (the output head) and of every node after it."""
    nodes = list(model.graph.node)
    last_conv = max(i for i, node in enumerate(nodes) if node.op_type == "Conv")
    return [node.name for node in nodes[last_conv:]]


def quantize_frame_graph(
    fp32_path: Path,
    out_path: Path,
    calibration: Sequence[dict[str, np.ndarray]],
    *,
    method: str = "minmax",
    reduce_range: bool | None = None,
    op_types: Sequence[str] = ("Conv", "MatMul", "Gemm"),
) -> Path:
    """Write an INT8 QDQ copy of `fp32_path` calibrated on `calibration` feeds.

    `reduce_range` uses 7-bit weights: on CPUs without VNNI (AVX2 only) the UINT8 x INT8
    products are summed in 16 bits and can saturate with full-range weights. None: 7-bit
    weights only where the CPU lacks VNNI (the quantised graph is then tuned to this CPU).
    """
    if reduce_range is None:
        reduce_range = not cpu_has_vnni()
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in methods:
        raise ValueError(f"method: expected one of {sorted(methods)}, got {method!r}")

    with tempfile.TemporaryDirectory() as folder:
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        excluded = head_and_tail(onnx.load(str(prepared)))
        quantize_static(
            str(prepared),
            str(out_path),
            _Feeds(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(op_types),
            nodes_to_exclude=excluded,
            calibrate_method=methods[method],
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    logger.info("INT8 per-frame graph written to %s (%d nodes kept in FP32)", out_path,
                len(excluded))
    return Path(out_path)
