"""The `avatar` console command: one entry point, one subcommand per job.

Each subcommand lives beside the code it drives and is registered here by dotted path.
Command modules import their heavy dependencies (PyTorch, ONNX) inside the command body,
so `avatar serve` works on the serving install, which has no PyTorch.
"""

from __future__ import annotations

import importlib
import logging

import typer

app = typer.Typer(
    name="avatar",
    help="Real-time one-shot head avatars (bi-layer model): serve, export, train, bench.",
    no_args_is_help=True,
    add_completion=False,
)
bench_app = typer.Typer(help="Benchmarks that print figures.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

# (typer app, command name, "module:function")
COMMANDS: list[tuple[typer.Typer, str, str]] = [
    (app, "serve", "server.commands:serve_command"),
    (app, "register", "server.commands:register_command"),
    (app, "drive", "server.commands:drive_command"),
    (bench_app, "stream", "server.commands:bench_stream_command"),
]


def _register_commands() -> None:
    """Attach every known command; a module that is not part of this install is skipped."""
    for target, name, path in COMMANDS:
        module_name, function_name = path.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            logging.getLogger(__name__).debug("command %s unavailable: %s", name, error)
            continue
        target.command(name)(getattr(module, function_name))


def main() -> None:
    """Console entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _register_commands()
    app()


if __name__ == "__main__":
    main()
