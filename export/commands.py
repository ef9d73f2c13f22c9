"""`avatar export`, `avatar build-engine` and `avatar bench frame`.

Plain typer-annotated functions; the CLI registers them by dotted path. PyTorch, ONNX and
TensorRT are imported inside the bodies, so importing this module is cheap.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Literal

import typer

logger = logging.getLogger(__name__)


def export_command(
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="Generator or training checkpoint; omitted: seeded random weights."),
    ] = None,
    preset: Annotated[
        str, typer.Option(help="Preset of the random weights (ignored with --checkpoint).")
    ] = "small",
    out: Annotated[Path, typer.Option(help="Bundle folder to write.")] = Path("weights/demo"),
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    fp32_checkpoint: Annotated[
        bool, typer.Option(help="Store FP32 weights (default: FP16, half the size).")
    ] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset (17 or later).")] = 17,
    parity: Annotated[bool, typer.Option(help="Check the graphs against PyTorch.")] = True,
    real: Annotated[
        bool, typer.Option(help="Include the real photo (mediapipe) in the parity check.")
    ] = True,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Export a checkpoint into a bundle: both ONNX graphs, manifest, generator weights."""
    from rich.console import Console

    from export.bundle import write_bundle
    from export.checkpoint import load_generator, random_generator
    from export.parity import bundle_parity

    console = Console(stderr=True)
    if opset < 17:
        raise typer.BadParameter(f"expected 17 or later, got {opset}", param_hint="--opset")

    # weights
    with console.status("loading weights"):
        if checkpoint is None:
            model, cfg = random_generator(preset, seed)
            trained = False
            console.print(f"random {preset} weights (seed {seed}, trained: false)")
        else:
            model, cfg = load_generator(checkpoint)
            trained = True
            console.print(f"{cfg.preset} weights from {checkpoint}")

    # the bundle
    with console.status("exporting") as status:

        def progress(message: str) -> None:
            status.update(message)
            console.print(message)

        manifest = write_bundle(
            model,
            cfg,
            out,
            trained,
            fp16_checkpoint=not fp32_checkpoint,
            opset=opset,
            notes={"source_checkpoint": str(checkpoint) if checkpoint else None, "seed": seed},
            progress=progress,
        )

    # parity, on the weights exactly as stored in the bundle
    rows = []
    if parity:
        with console.status("checking parity with PyTorch"):
            stored, _ = load_generator(manifest.checkpoint_path)
            rows = bundle_parity(
                stored, manifest.graph_path("register"), manifest.graph_path("frame"), real=real
            )
        for row in rows:
            verdict = "[green]ok[/green]" if row.passed else "[red]FAILED[/red]"
            figures = ", ".join(f"{k}={v:.3g}" for k, v in row.figures.items())
            console.print(
                f"parity {row.graph:8s} {row.inputs:14s} b{row.batch}: {verdict} {figures}"
            )

    sizes = {
        path.name: round(path.stat().st_size / 1e6, 2) for path in sorted(Path(out).iterdir())
        if path.is_file()
    }
    result = {
        "bundle": str(out),
        "preset": manifest.preset,
        "trained": manifest.trained,
        "param_count": manifest.param_count,
        "files_mb": sizes,
        "parity": [row.to_dict() for row in rows],
        "parity_passed": all(row.passed for row in rows),
    }
    if json_output:
        typer.echo(json.dumps(result, indent=2))
    else:
        console.print(f"bundle {out}: {sum(sizes.values()):.1f} MB {sizes}")
    if rows and not result["parity_passed"]:
        raise typer.Exit(code=1)


def build_engine_command(
    bundle: Annotated[Path, typer.Option(help="Bundle folder.")] = Path("weights/demo"),
    out: Annotated[
        Path | None, typer.Option(help="Engine file (default: BUNDLE/engines/frame-fp16.engine).")
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Largest batch of the profile.")] = 16,
    opt_batch: Annotated[
        int | None, typer.Option(help="Batch TensorRT tunes for (default: max/2).")
    ] = None,
    fp32: Annotated[bool, typer.Option(help="Build an FP32 engine instead of FP16.")] = False,
    rebuild: Annotated[
        bool, typer.Option(help="Rebuild even if a matching engine exists.")
    ] = False,
    device: Annotated[int, typer.Option(help="CUDA device index.")] = 0,
    json_output: Annotated[bool, typer.Option("--json", help="Print metadata as JSON.")] = False,
) -> None:
    """Build the TensorRT engine of a bundle's per-frame graph for this GPU."""
    from export.bundle import load_manifest
    from export.tensorrt_build import (
        StaleEngineError,
        build_engine,
        check_engine,
        default_engine_path,
    )

    manifest = load_manifest(bundle)
    precision: Literal["fp16", "fp32"] = "fp32" if fp32 else "fp16"
    engine_path = out or default_engine_path(bundle, precision)
    onnx_path = manifest.graph_path("frame")

    try:
        if not rebuild:
            try:
                metadata = check_engine(
                    engine_path, onnx_path, max_batch=max_batch, precision=precision,
                    device=device,
                )
                typer.echo(f"engine {engine_path} is up to date", err=True)
                if json_output:
                    typer.echo(json.dumps(metadata, indent=2))
                return
            except StaleEngineError as error:
                if engine_path.exists():
                    typer.echo(f"{error}", err=True)
                    raise typer.Exit(code=1) from error
        metadata = build_engine(
            onnx_path, engine_path, max_batch=max_batch, opt_batch=opt_batch,
            precision=precision, device=device,
        ).to_dict()
    except ImportError as error:
        typer.echo(f"cannot build an engine here: {error}", err=True)
        raise typer.Exit(code=2) from error

    typer.echo(f"engine written: {engine_path} ({metadata['build_seconds']} s)", err=True)
    if json_output:
        typer.echo(json.dumps(metadata, indent=2))


def bench_frame_command(
    preset: Annotated[str, typer.Option(help="paper or small (seeded random weights).")] = "paper",
    runtime: Annotated[
        list[str] | None,
        typer.Option(help="Runtime(s) to measure; repeat the option. Default: all CPU ones."),
    ] = None,
    batch: Annotated[int, typer.Option(help="Frames per call.")] = 1,
    iterations: Annotated[int, typer.Option(help="Timed calls per runtime.")] = 50,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: cores).")] = None,
    bundle: Annotated[
        Path | None, typer.Option(help="Measure this bundle's weights instead of random ones.")
    ] = None,
    registration: Annotated[
        bool,
        typer.Option(help="Also time registration, with and without the Enhancer (ONNX)."),
    ] = False,
    json_out: Annotated[Path | None, typer.Option(help="Also write the JSON here.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Per-frame speed of several runtimes in one run (ratios compare; raw ms are noisy)."""
    from export.bench import DEFAULT_RUNTIMES, PRECISION, run_frame_bench, run_register_bench

    if preset not in ("paper", "small"):
        raise typer.BadParameter(f"expected paper or small, got {preset!r}", param_hint="--preset")
    unknown = [name for name in runtime or [] if name not in PRECISION]
    if unknown:
        raise typer.BadParameter(
            f"unknown {unknown}; expected some of {sorted(PRECISION)}", param_hint="--runtime"
        )
    if batch < 1:
        raise typer.BadParameter(f"expected 1 or more, got {batch}", param_hint="--batch")

    result = run_frame_bench(
        preset=preset,
        runtimes=runtime or list(DEFAULT_RUNTIMES),
        batch=batch,
        iterations=iterations,
        threads=threads,
        bundle=bundle,
        log=lambda message: typer.echo(message, err=True),
    )
    if registration:
        result["registration"] = run_register_bench(
            preset=result["preset"], threads=threads, bundle=bundle,
            log=lambda message: typer.echo(message, err=True),
        )["results"]
    text = json.dumps(result, indent=2)
    if json_out is not None:
        json_out.write_text(text + "\n")
    if json_output:
        typer.echo(text)
        return
    typer.echo(
        f"{result['preset']} ({result['weights']} weights), {result['threads']} threads, "
        f"{result['frame_gmac']} GMAC/frame; conv peak: {result['conv_peak_gflops']:.1f} GFLOP/s"
    )
    for row in result["results"]:
        typer.echo(
            f"{row['runtime']:28s} {row['precision']:5s} b{row['batch']}: "
            f"{row['ms_per_frame']:7.2f} ms/frame {row['fps']:7.1f} fps "
            f"{row['gflops']:6.1f} GFLOP/s  PSNR {row['psnr_vs_fp32_db']} dB"
        )
    for row in result.get("registration", []):
        typer.echo(f"registration ({row['runtime']}, enhancer {row['enhancer']}): "
                   f"{row['seconds']:.3f} s")
