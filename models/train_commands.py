"""`avatar train`, `avatar train dcgan` and `avatar eval`: thin typer wrappers.

Heavy imports (PyTorch, the networks) happen inside the command bodies, so importing this
module costs nothing on the serving install.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any, cast

import typer

logger = logging.getLogger(__name__)


def _parse_channels(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError as error:
        raise typer.BadParameter(
            f"expected 6 comma-separated integers, got {text!r}", param_hint="--disc-channels"
        ) from error
    if len(values) != 6:
        raise typer.BadParameter(
            f"expected 6 comma-separated integers, got {len(values)}", param_hint="--disc-channels"
        )
    return values


def train_command(
    data: Annotated[
        Path, typer.Option(help="Prepared pair data (avatar prepare-data output).")
    ] = Path("artifacts/synth128"),
    out: Annotated[Path, typer.Option(help="Run folder: checkpoints, TensorBoard, metrics.")] = (
        Path("runs/train")
    ),
    preset: Annotated[str, typer.Option(help="Model preset: small or paper.")] = "small",
    stage: Annotated[
        str, typer.Option(help="base (all generator networks) or enhancer (base frozen).")
    ] = "base",
    steps: Annotated[int, typer.Option(help="Generator steps to reach (counted from 0).")] = 1000,
    batch: Annotated[int, typer.Option(help="Pairs per batch.")] = 8,
    lr: Annotated[float, typer.Option(help="Adam learning rate (both networks).")] = 2e-4,
    k_disc: Annotated[int, typer.Option(help="Discriminator steps per generator step.")] = 1,
    adversarial: Annotated[
        str, typer.Option(help="rahinge, hinge, minimax or non_saturating.")
    ] = "rahinge",
    disc_channels: Annotated[
        str | None,
        typer.Option(help="Override the preset's discriminator widths, e.g. 8,16,32,64,64,64."),
    ] = None,
    enhance_in_base: Annotated[
        bool,
        typer.Option(help="Stage base: train the Texture Enhancer jointly (one stage)."),
    ] = False,
    frame_l1: Annotated[
        float,
        typer.Option(help="Weight of the L1 on the LF-detached frame (0: the paper's recipe)."),
    ] = 10.0,
    vgg19: Annotated[
        Path | None, typer.Option(help="VGG19 (ImageNet) state dict for the perceptual loss.")
    ] = None,
    vggface: Annotated[
        Path | None, typer.Option(help="VGGFace (VGG16 layout) state dict, perceptual loss.")
    ] = None,
    resume: Annotated[Path | None, typer.Option(help="Checkpoint to continue from.")] = None,
    base_checkpoint: Annotated[
        Path | None, typer.Option(help="Stage enhancer: the trained base checkpoint.")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of weights, batches and augmentation.")] = 0,
    num_threads: Annotated[
        int | None, typer.Option(help="PyTorch CPU threads (default: PyTorch's choice).")
    ] = None,
    amp: Annotated[bool, typer.Option(help="Mixed precision (CUDA only).")] = True,
    checkpoint_minutes: Annotated[
        float, typer.Option(help="Save a checkpoint at least this often.")
    ] = 5.0,
    checkpoint_every: Annotated[int, typer.Option(help="... and every N steps.")] = 1000,
    log_every: Annotated[int, typer.Option(help="Scalars every N steps.")] = 10,
    image_every: Annotated[int, typer.Option(help="Image grids every N steps.")] = 200,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
    json_output: Annotated[bool, typer.Option("--json", help="Print the final losses.")] = False,
) -> None:
    """Train the bi-layer model (stage base, then stage enhancer) on prepared pairs."""
    from models import gan
    from models.losses import LossWeights
    from models.train import TrainOptions, train

    if stage not in ("base", "enhancer"):
        raise typer.BadParameter(f"expected base or enhancer, got {stage!r}", param_hint="--stage")
    if adversarial not in gan.ADVERSARIAL_LOSSES:
        raise typer.BadParameter(
            f"expected one of {', '.join(gan.ADVERSARIAL_LOSSES)}, got {adversarial!r}",
            param_hint="--adversarial",
        )
    options = TrainOptions(
        data_dir=data,
        out_dir=out,
        preset=preset,
        stage=cast(Any, stage),
        steps=steps,
        batch_size=batch,
        lr=lr,
        k_disc=k_disc,
        adversarial=cast(Any, adversarial),
        disc_channels=_parse_channels(disc_channels),
        enhance_in_base=enhance_in_base,
        weights=LossWeights(frame_l1=frame_l1),
        vgg19_weights=vgg19,
        vggface_weights=vggface,
        resume=resume,
        base_checkpoint=base_checkpoint,
        device=device,
        seed=seed,
        num_threads=num_threads,
        amp=amp,
        checkpoint_minutes=checkpoint_minutes,
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        image_every=image_every,
        progress=progress and not json_output,
    )
    stats = train(options)
    if json_output:
        typer.echo(json.dumps({"out": str(out), "losses": stats}))
    else:
        typer.echo(f"done: checkpoint {out / 'last.pt'}")


def train_dcgan_command(
    image_dir: Annotated[
        Path,
        typer.Argument(help="Folder of training images (any size; resized).", exists=True),
    ],
    out: Annotated[Path, typer.Option(help="Run folder: sample grids, checkpoint.")] = Path(
        "runs/dcgan"
    ),
    steps: Annotated[int, typer.Option(help="Generator steps.")] = 5000,
    batch: Annotated[int, typer.Option(help="Images per batch.")] = 64,
    k_disc: Annotated[int, typer.Option(help="Discriminator steps per generator step.")] = 1,
    loss: Annotated[
        str, typer.Option(help="minimax, non_saturating, hinge or rahinge.")
    ] = "non_saturating",
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 2e-4,
    width: Annotated[int, typer.Option(help="Channels at 32x32 (64 in the DCGAN paper).")] = 64,
    sample_every: Annotated[int, typer.Option(help="Write a sample grid every N steps.")] = 500,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Train the DCGAN reference with alternating k-D / 1-G updates; writes sample grids."""
    from models import dcgan, gan

    if loss not in gan.ADVERSARIAL_LOSSES:
        raise typer.BadParameter(
            f"expected one of {', '.join(gan.ADVERSARIAL_LOSSES)}, got {loss!r}",
            param_hint="--loss",
        )
    result = dcgan.train_dcgan(
        image_dir,
        out,
        steps=steps,
        batch_size=batch,
        k_disc=k_disc,
        device=device,
        seed=seed,
        sample_every=sample_every,
        config=dcgan.DcganConfig(width=width),
        loss=cast(Any, loss),
        lr=lr,
        progress=not json_output,
    )
    summary = {
        "checkpoint": str(result.checkpoint),
        "samples": [str(path) for path in result.samples],
        "steps": result.steps,
        "stats": result.stats,
    }
    if json_output:
        typer.echo(json.dumps(summary))
    else:
        typer.echo(f"done: {result.steps} steps, samples in {out}, checkpoint {result.checkpoint}")


def eval_command(
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="Checkpoint (training or bundle); default: weights/demo/checkpoint.pt."),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="Held-out pair data; default: the set shipped with the weights."),
    ] = None,
    pairs: Annotated[int, typer.Option(help="At most this many pairs (0: all).")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    grid: Annotated[
        Path | None,
        typer.Option(help="Also save a PNG of held-out examples: source | pose | output | target."),
    ] = None,
    grid_rows: Annotated[int, typer.Option(min=1, help="Rows of the example grid.")] = 6,
    json_output: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """PSNR, SSIM and pose error of the model vs the unchanged-source baseline."""
    from models.evaluate import default_paths, evaluate, example_grid

    checkpoint_path, data_path = default_paths(checkpoint, data)
    report = evaluate(checkpoint_path, data_path, max_pairs=pairs, device=device)
    if grid is not None:
        report["grid"] = str(example_grid(checkpoint_path, data_path, grid, count=grid_rows))
    if json_output:
        typer.echo(json.dumps(report))
        return
    for name in ("model", "baseline"):
        figures = report[name]
        error = figures["pose_error"]
        error_text = "n/a (no face found)" if error is None else f"{error:.3f}"
        typer.echo(
            f"{name:9s} PSNR {figures['psnr']:.2f} dB  SSIM {figures['ssim']:.3f}  "
            f"pose error {error_text} (faces found {figures['detected']:.0%})"
        )
    typer.echo(f"pairs: {report['pairs']}")
    if grid is not None:
        typer.echo(f"examples: {report['grid']}")


def curve_command(
    metrics: Annotated[
        list[Path],
        typer.Argument(help="metrics.jsonl of one run, or of its stages in order.", exists=True),
    ],
    out: Annotated[Path, typer.Option(help="PNG to write.")] = Path("training-curve.png"),
    smooth: Annotated[int, typer.Option(help="Moving average over this many log points.")] = 5,
) -> None:
    """Plot the named loss terms of training runs (their metrics.jsonl) into one PNG."""
    from models.evaluate import plot_training_curves

    if smooth < 1:
        raise typer.BadParameter(f"expected 1 or more, got {smooth}", param_hint="--smooth")
    typer.echo(str(plot_training_curves(list(metrics), out, smooth=smooth)))


def main() -> None:
    """Run the train command without the `avatar` entry point (background runs)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    typer.run(train_command)


if __name__ == "__main__":
    main()
