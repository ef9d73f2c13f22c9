"""Evaluation on a tiny held-out set: real synthetic clips of a held-out photo, real
mediapipe landmarks, a real (untrained) model checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from models.bilayer import BilayerModel
from models.config import get_config
from models.data.prepare import PrepareOptions, find_photo_jobs, prepare
from models.evaluate import evaluate, example_grid, inter_ocular
from models.pose import denormalise_pose

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "heldout"
PAIRS = 6


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("heldout")
    photos = root / "photos" / "biden"
    photos.mkdir(parents=True)
    shutil.copy(next((ASSETS / "biden").glob("*.jpg")), photos / "biden.jpg")
    options = PrepareOptions(
        image_size=128, clips_per_photo=2, frames_per_clip=3, split="heldout", workers=1, seed=3
    )
    report = prepare(find_photo_jobs(root / "photos", options), root / "clips", options)
    assert report.frames_written == PAIRS
    return root / "clips"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained small-preset generator saved the way the weight bundle saves it."""
    torch.manual_seed(0)
    cfg = get_config("small")
    model = BilayerModel(cfg, spectral_norm=False)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    torch.save({"format": 1, "config": cfg.to_dict(), "generator": model.state_dict()}, path)
    return path


def test_inter_ocular_distance_of_known_points():
    points = np.zeros((68, 2), dtype=np.float32)
    points[36:42] = [10.0, 50.0]
    points[42:48] = [40.0, 50.0]
    assert inter_ocular(points) == pytest.approx(30.0)


def test_eval_reports_model_baseline_and_detector_floor(heldout, checkpoint):
    torch.set_num_threads(1)
    report = evaluate(checkpoint, heldout)

    assert report["pairs"] == PAIRS
    for name in ("model", "baseline"):
        assert set(report[name]) == {"psnr", "ssim", "pose_error", "detected"}
        assert np.isfinite(report[name]["psnr"]) and -1 <= report[name]["ssim"] <= 1

    # the detector finds the face on the ground-truth frames and on the unchanged
    # source; the ground truth follows the driving pose better than the source does
    assert report["target"]["detected"] == 1.0 and report["baseline"]["detected"] == 1.0
    assert report["target"]["pose_error"] < report["baseline"]["pose_error"]

    # the source differs from the target frame: the baseline is not a perfect copy
    assert report["baseline"]["psnr"] < 60


def test_eval_command_prints_json(heldout, checkpoint):
    import typer

    from models.train_commands import eval_command

    app = typer.Typer()
    app.command()(eval_command)
    result = CliRunner().invoke(
        app, ["--checkpoint", str(checkpoint), "--data", str(heldout), "--pairs", "2", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["pairs"] == 2 and set(report) >= {"model", "baseline", "pairs"}

    missing = CliRunner().invoke(app, ["--checkpoint", str(checkpoint / "nothing.pt")])
    assert missing.exit_code != 0


def test_example_grid_rows_are_source_driver_output_target(heldout, checkpoint, tmp_path):
    path = example_grid(checkpoint, heldout, tmp_path / "grid.png", count=3)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (3 * 128, 4 * 128, 3)

    # the driver column is the stickman of the target pose: coloured lines on black,
    # drawn where the target's landmarks are
    from models.data.dataset import PairDataset

    item = PairDataset(heldout, image_size=128, split="heldout")[0]
    stickman = grid[:128, 128:256]
    points = denormalise_pose(item["target_pose"].numpy(), 128).round().astype(int)
    on_line = stickman[points[:, 1].clip(0, 127), points[:, 0].clip(0, 127)].max(axis=1)
    assert (on_line > 0).mean() > 0.8 and (stickman.max(axis=2) == 0).mean() > 0.7


def test_eval_command_text_output_and_grid(heldout, checkpoint, tmp_path):
    """The text report handles a model whose frames show no face, and writes the grid."""
    import typer

    from models.train_commands import eval_command

    app = typer.Typer()
    app.command()(eval_command)
    grid = tmp_path / "examples.png"
    result = CliRunner().invoke(
        app,
        ["--checkpoint", str(checkpoint), "--data", str(heldout), "--pairs", "2",
         "--grid", str(grid), "--grid-rows", "2"],
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    model_line = next(line for line in lines if line.startswith("model"))
    baseline_line = next(line for line in lines if line.startswith("baseline"))
    assert "pose error" in model_line and "faces found" in model_line
    assert "n/a" not in baseline_line  # the unchanged source photo always shows a face
    assert f"examples: {grid}" in lines
    assert np.asarray(Image.open(grid)).shape == (2 * 128, 4 * 128, 3)


def test_train_curve_command_plots_every_stage(tmp_path):
    import typer

    from models.train_commands import curve_command

    stages = []
    for stage, start in (("base", 0), ("enhancer", 0)):
        path = tmp_path / f"{stage}.jsonl"
        rows = [{"step": start + i, "loss/G/lf_l1": 1.0 / (i + 1), "loss/D/real": 0.5}
                for i in range(1, 12)]
        path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
        stages.append(str(path))
    app = typer.Typer()
    app.command()(curve_command)
    out = tmp_path / "curve.png"
    result = CliRunner().invoke(app, [*stages, "--out", str(out), "--smooth", "3"])
    assert result.exit_code == 0, result.output
    image = np.asarray(Image.open(out))
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400

    bad = CliRunner().invoke(app, [stages[0], "--smooth", "0"])
    assert bad.exit_code == 2 and "expected 1 or more" in bad.output
