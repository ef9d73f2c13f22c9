"""`avatar prepare-data`: talking-head videos or portrait photos -> training clips."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Literal, cast

import typer

logger = logging.getLogger(__name__)


def prepare_data_command(
    videos_dir: Annotated[
        Path,
        typer.Argument(
            help="Videos in the VoxCeleb2 layout person/video/clip.mp4 (or clip folders "
            "of frames); with --synthetic, portrait photos: <identity>/*.jpg.",
            exists=True,
            file_okay=False,
        ),
    ],
    out_dir: Annotated[Path, typer.Argument(help="Where the prepared clips go.")],
    synthetic: Annotated[
        bool, typer.Option(help="Make synthetic pseudo-video clips from still photos.")
    ] = False,
    image_size: Annotated[int, typer.Option(help="Crop size in pixels.")] = 256,
    every: Annotated[int, typer.Option(help="Videos: keep every k-th frame.")] = 5,
    max_frames: Annotated[int, typer.Option(help="Videos: kept frames per clip.")] = 32,
    clips_per_photo: Annotated[int, typer.Option(help="Synthetic: clips per photo.")] = 40,
    frames_per_clip: Annotated[int, typer.Option(help="Synthetic: frames per clip.")] = 12,
    split: Annotated[
        str, typer.Option(help="train, heldout, or auto (held-out share by identity).")
    ] = "train",
    heldout_percent: Annotated[
        float, typer.Option(help="With --split auto: percent of identities held out.")
    ] = 5.0,
    workers: Annotated[int, typer.Option(help="Worker processes (1: no pool).")] = 2,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic motions.")] = 0,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the report as JSON.")
    ] = False,
) -> None:
    """Prepare training data (frames, keypoints, masks) from videos or portrait photos."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from models.data.prepare import PrepareOptions, find_photo_jobs, find_video_jobs, prepare

    if split not in ("train", "heldout", "auto"):
        raise typer.BadParameter(
            f"expected train, heldout or auto, got {split!r}", param_hint="--split"
        )
    options = PrepareOptions(
        image_size=image_size, every=every, max_frames=max_frames,
        clips_per_photo=clips_per_photo, frames_per_clip=frames_per_clip,
        heldout_percent=heldout_percent, workers=workers, seed=seed,
        split=cast(Literal["train", "heldout", "auto"], split),
    )
    jobs = (find_photo_jobs if synthetic else find_video_jobs)(videos_dir, options)
    if not jobs:
        kind = "photos (<identity>/*.jpg)" if synthetic else "clips (person/video/clip.mp4)"
        raise typer.BadParameter(f"no {kind} found in {videos_dir}", param_hint="VIDEOS_DIR")

    with Progress(
        "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
        TimeRemainingColumn(), disable=json_output,
    ) as progress:
        task = progress.add_task("clips", total=len(jobs))
        report = prepare(
            jobs, out_dir, options,
            on_progress=lambda done, total: progress.update(task, completed=done),
        )

    summary = report.to_dict()
    if json_output:
        typer.echo(json.dumps(summary))
        return
    typer.echo(
        f"{report.clips_done} clips made, {report.clips_skipped} already there, "
        f"{report.frames_written} frames written to {out_dir}"
    )
    if report.failed:
        typer.echo(f"frames without a usable face, by reason: {report.failed}")
    if report.empty_clips:
        typer.echo(f"{report.empty_clips} clips have fewer than 2 usable frames (no pairs)")
    typer.echo(f"dataset now: {summary['dataset_clips']} clips, frames {summary['dataset_frames']}")
