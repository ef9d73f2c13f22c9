"""Fixtures of the export tests: seeded models of both presets and their exported graphs,
made once per test session in a temporary folder."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from export.bundle import BundleManifest, write_bundle
from export.checkpoint import load_generator, random_generator
from export.onnx_export import export_frame_graph
from export.parity import astronaut_source
from models.bilayer import BilayerModel
from models.config import ModelConfig


@dataclass
class Exported:
    """A model and the graphs exported from it."""

    model: BilayerModel
    cfg: ModelConfig
    frame_path: Path
    register_path: Path | None = None
    manifest: BundleManifest | None = None


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def small_bundle(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """The small preset written as a full bundle (FP16 checkpoint, both graphs)."""
    model, cfg = random_generator("small", seed=0)
    folder = tmp_path_factory.mktemp("small-bundle")
    manifest = write_bundle(model, cfg, folder, trained=False)

    # the bundle's graphs come from the FP16-rounded weights: compare against those
    stored, _ = load_generator(manifest.checkpoint_path)
    return Exported(
        model=stored,
        cfg=cfg,
        frame_path=manifest.graph_path("frame"),
        register_path=manifest.graph_path("register"),
        manifest=manifest,
    )


@pytest.fixture(scope="session")
def paper_frame(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """The paper preset's per-frame graph (the registration graph is exported by the
    slow test that needs it)."""
    model, cfg = random_generator("paper", seed=0)
    path = tmp_path_factory.mktemp("paper") / "frame.onnx"
    export_frame_graph(model, cfg, path)
    return Exported(model=model, cfg=cfg, frame_path=path)


@pytest.fixture(scope="session")
def astronaut_128() -> dict[str, np.ndarray]:
    """The astronaut prepared by the real pose pipeline at the small preset's size."""
    return astronaut_source(128)
