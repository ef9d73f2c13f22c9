"""Weight bundles: the folder the server runs from.

A bundle holds everything a server needs for one model, and nothing it must not trust
blindly:

    manifest.json   what the bundle is (preset, config, parameter layout, hashes)
    register.onnx   registration graph: image, stickman, pose, mask -> texture, params
    frame.onnx      per-frame graph: pose, texture, params -> frame (uint8), mask (uint8)
    checkpoint.pt   generator weights (PyTorch), for the PyTorch runtime and re-export

Reading a manifest needs no PyTorch (the serving install has none); writing a bundle
does, and imports it inside `write_bundle`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = 1
MANIFEST_NAME = "manifest.json"
CHECKPOINT_NAME = "checkpoint.pt"
GRAPH_NAMES = {"register": "register.onnx", "frame": "frame.onnx"}
REQUIRED_KEYS = {
    "preset": str,
    "config": dict,
    "image_size": int,
    "param_count": int,
    "checkpoint_sha256": str,
    "trained": bool,
    "graphs": dict,
    "param_layout": list,
    "created": str,
}


class BundleError(ValueError):
    """A bundle folder is missing, incomplete or inconsistent; the message says how."""


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class BundleManifest:
    """A validated `manifest.json` and the folder it describes.

    Fields carry the manifest's keys; `manifest["preset"]` works as well as
    `manifest.preset`.
    """

    directory: Path
    preset: str
    config: dict[str, Any]
    image_size: int
    param_count: int
    checkpoint_sha256: str
    trained: bool
    graphs: dict[str, str]
    param_layout: list[tuple[str, tuple[int, ...]]]
    created: str
    extra: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        if key in REQUIRED_KEYS:
            return getattr(self, key)
        return self.extra[key]

    def graph_path(self, name: str) -> Path:
        """Path of the "register" or "frame" graph."""
        if name not in self.graphs:
            raise KeyError(f"graph {name!r} not in bundle; it has {sorted(self.graphs)}")
        return self.directory / self.graphs[name]

    @property
    def checkpoint_path(self) -> Path:
        return self.directory / CHECKPOINT_NAME

    def to_dict(self) -> dict[str, Any]:
        """The manifest as written to JSON."""
        data = {key: getattr(self, key) for key in REQUIRED_KEYS}
        data["param_layout"] = [[name, list(shape)] for name, shape in self.param_layout]
        return {**data, **self.extra}


def load_manifest(path: Path | str, *, verify_hashes: bool = False) -> BundleManifest:
    """Read and check a bundle's manifest; `path` is the folder or its manifest.json.

    Checks the keys and their types, that the graphs exist, and that the parameter layout
    adds up to `param_count`. With `verify_hashes` the checkpoint's SHA-256 is checked too.
    """
    path = Path(path)
    manifest_file = path / MANIFEST_NAME if path.is_dir() else path
    if not manifest_file.exists():
        raise BundleError(f"no bundle manifest at {manifest_file}")
    try:
        data = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as error:
        raise BundleError(f"{manifest_file}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise BundleError(f"{manifest_file}: expected a JSON object, got {type(data).__name__}")

    # keys and types
    for key, kind in REQUIRED_KEYS.items():
        if key not in data:
            raise BundleError(f"{manifest_file}: missing key {key!r}")
        if not isinstance(data[key], kind):
            raise BundleError(
                f"{manifest_file}: {key!r} must be {kind.__name__}, "
                f"got {type(data[key]).__name__}"
            )

    # graphs present
    directory = manifest_file.parent
    for name in GRAPH_NAMES:
        if name not in data["graphs"]:
            raise BundleError(f"{manifest_file}: graphs must name {sorted(GRAPH_NAMES)}")
        if not (directory / data["graphs"][name]).exists():
            raise BundleError(f"{manifest_file}: graph file {data['graphs'][name]} is missing")

    # layout and sizes agree
    layout = [(str(name), tuple(int(d) for d in shape)) for name, shape in data["param_layout"]]
    total = sum(math.prod(shape) for _, shape in layout)
    if total != data["param_count"]:
        raise BundleError(
            f"{manifest_file}: param_layout adds up to {total}, param_count says "
            f"{data['param_count']}"
        )
    if data["config"].get("image_size") != data["image_size"]:
        raise BundleError(
            f"{manifest_file}: image_size {data['image_size']} differs from the config's "
            f"{data['config'].get('image_size')}"
        )

    if verify_hashes:
        checkpoint = directory / CHECKPOINT_NAME
        if not checkpoint.exists():
            raise BundleError(f"{manifest_file}: {CHECKPOINT_NAME} is missing")
        digest = sha256_file(checkpoint)
        if digest != data["checkpoint_sha256"]:
            raise BundleError(
                f"{checkpoint}: SHA-256 {digest} differs from the manifest's "
                f"{data['checkpoint_sha256']}"
            )

    extra = {key: value for key, value in data.items() if key not in REQUIRED_KEYS}
    return BundleManifest(
        directory=directory,
        preset=data["preset"],
        config=data["config"],
        image_size=data["image_size"],
        param_count=data["param_count"],
        checkpoint_sha256=data["checkpoint_sha256"],
        trained=data["trained"],
        graphs={name: data["graphs"][name] for name in data["graphs"]},
        param_layout=layout,
        created=data["created"],
        extra=extra,
    )


def write_bundle(
    model: Any,
    cfg: Any,
    out_dir: Path,
    trained: bool,
    *,
    fp16_checkpoint: bool = True,
    opset: int = 17,
    notes: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> BundleManifest:
    """Export `model` (a BilayerModel) into a bundle folder and write its manifest.

    With `fp16_checkpoint` the generator weights are rounded to FP16 first, stored so,
    and the graphs are exported from the rounded weights, so that the checkpoint and the
    graphs describe exactly the same model. Returns the loaded manifest.
    """
    import copy

    import torch

    from export.checkpoint import GENERATOR_FORMAT, round_weights_fp16
    from export.onnx_export import export_frame_graph, export_register_graph, frame_param_layout
    from models.layers import has_spectral_norm, remove_spectral_norm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda message: logger.info("%s", message))

    # work on a copy: the caller's model keeps its weights and spectral norm
    model = copy.deepcopy(model).eval()
    if has_spectral_norm(model):
        remove_spectral_norm(model)

    # the checkpoint first: the graphs come from exactly these weights
    if fp16_checkpoint:
        round_weights_fp16(model)
    state = {
        key: value.half() if fp16_checkpoint and value.is_floating_point() else value
        for key, value in model.state_dict().items()
    }
    checkpoint = out_dir / CHECKPOINT_NAME
    torch.save(
        {"format": GENERATOR_FORMAT, "config": cfg.to_dict(), "generator": state,
         "trained": trained},
        checkpoint,
    )
    say(f"checkpoint written: {checkpoint}")

    # the two graphs
    register_path = out_dir / GRAPH_NAMES["register"]
    export_register_graph(model, cfg, register_path, opset=opset)
    say(f"registration graph written: {register_path}")
    frame_path = out_dir / GRAPH_NAMES["frame"]
    export_frame_graph(model, cfg, frame_path, opset=opset)
    say(f"per-frame graph written: {frame_path}")

    # the manifest names and hashes them
    layout = frame_param_layout(model)
    manifest = {
        "format": BUNDLE_FORMAT,
        "preset": cfg.preset,
        "config": cfg.to_dict(),
        "image_size": cfg.image_size,
        "param_count": sum(math.prod(shape) for _, shape in layout),
        "checkpoint_sha256": sha256_file(checkpoint),
        "trained": trained,
        "graphs": dict(GRAPH_NAMES),
        "graph_sha256": {
            name: sha256_file(out_dir / filename) for name, filename in GRAPH_NAMES.items()
        },
        "param_layout": [[name, list(shape)] for name, shape in layout],
        "param_semantics": (
            "batch norm folded: each adaptive norm's scale and bias already include the "
            "norm's running statistics (y = x * scale + bias); see docs/export.md"
        ),
        "opset": opset,
        "align_corners": cfg.align_corners,
        "checkpoint_dtype": "float16" if fp16_checkpoint else "float32",
        "exporter": {"torch": torch.__version__.split("+")[0]},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(notes or {}),
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    say(f"manifest written: {out_dir / MANIFEST_NAME}")
    return load_manifest(out_dir, verify_hashes=True)
