"""Parameter and MAC figures of `avatar model-info` against the released design."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from models.info import model_info, model_info_command

# the released architecture, counted on conv and linear layers
RELEASED_FRAME_GMAC = 4.31
RELEASED_FRAME_PARAMS = 5.34e6
RELEASED_ADAPTIVE = 244_576
RELEASED_EMBEDDER_GMAC = 52.8


@pytest.fixture(scope="module")
def paper() -> dict:
    return model_info("paper")


def test_paper_frame_cost_is_near_the_released_design(paper: dict) -> None:
    frame = paper["frame_gmac"]
    assert abs(frame - RELEASED_FRAME_GMAC) / RELEASED_FRAME_GMAC < 0.10

    # the only difference: the skip convs run before their upsampling (4x fewer MACs)
    released_layout = frame + paper["skip_rewrite_saving_gmac"]
    assert abs(released_layout - RELEASED_FRAME_GMAC) / RELEASED_FRAME_GMAC < 0.01
    assert 0.35 < paper["skip_rewrite_saving_gmac"] < 0.39

    parts = paper["frame_gmac_parts"]
    assert sum(parts.values()) == pytest.approx(frame, abs=1e-3)
    assert parts["inference_generator"] > 0.99 * frame - parts["warp"] - parts["keypoint_mlp"]


def test_paper_sizes_match_the_released_design(paper: dict) -> None:
    assert paper["adaptive_params"] == RELEASED_ADAPTIVE
    assert abs(paper["frame_params"] - RELEASED_FRAME_PARAMS) / RELEASED_FRAME_PARAMS < 0.01
    embedder = paper["register_gmac"]["embedder"]
    assert abs(embedder - RELEASED_EMBEDDER_GMAC) / RELEASED_EMBEDDER_GMAC < 0.02
    assert paper["params"]["keypoint_mlp"] == 136 * 256 + 256 + 2 * (256 * 256 + 256) + 4096 * 257


def test_small_preset_fits_its_budget() -> None:
    small = model_info("small")
    assert small["image_size"] == 128
    assert small["generator_params"] <= 3_000_000
    assert small["frame_gmac"] <= 0.3
    assert small["generator_params"] == sum(
        count for name, count in small["params"].items() if name != "discriminator"
    )


def test_command_prints_json_and_a_table() -> None:
    app = typer.Typer()
    app.command()(model_info_command)
    runner = CliRunner()

    result = runner.invoke(app, ["--preset", "small", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["preset"] == "small"
    assert set(data["params"]) >= {"embedder", "inference_generator", "keypoint_mlp"}
    assert data["frame_gmac"] > 0

    table = runner.invoke(app, ["--preset", "small"])
    assert table.exit_code == 0, table.output
    assert "inference_generator" in table.output

    bad = runner.invoke(app, ["--preset", "huge", "--json"])
    assert bad.exit_code != 0
