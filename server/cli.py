"""The `avatar` console command: one entry point, one subcommand per job.

Each subcommand lives beside the code it drives and is registered here by dotted path.
Command modules import their heavy dependencies (PyTorch, ONNX) inside the command body,
so `avatar serve` works on the serving install, which has no PyTorch.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

import typer

app = typer.Typer(
    name="avatar",
    help="Real-time one-shot head avatars (bi-layer model): serve, export, train, bench.",
    no_args_is_help=True,
    add_completion=False,
)
bench_app = typer.Typer(help="Benchmarks that print figures.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
train_app = typer.Typer(
    help="Train the bi-layer model (options below), or `avatar train dcgan` for the reference.",
    invoke_without_command=True,
)
app.add_typer(train_app, name="train")
keys_app = typer.Typer(help="API keys: create, list, revoke.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

# (typer app, command name, "module:function")
COMMANDS: list[tuple[typer.Typer, str, str]] = [
    (app, "serve", "server.commands:serve_command"),
    (app, "register", "server.commands:register_command"),
    (app, "drive", "server.commands:drive_command"),
    (bench_app, "stream", "server.commands:bench_stream_command"),
    (keys_app, "create", "server.key_commands:keys_create_command"),
    (keys_app, "list", "server.key_commands:keys_list_command"),
    (keys_app, "revoke", "server.key_commands:keys_revoke_command"),
    (bench_app, "frame", "export.commands:bench_frame_command"),
    (app, "export", "export.commands:export_command"),
    (app, "build-engine", "export.commands:build_engine_command"),
    (app, "model-info", "models.info:model_info_command"),
    (app, "prepare-data", "models.data.commands:prepare_data_command"),
    (app, "eval", "models.train_commands:eval_command"),
    (train_app, "dcgan", "models.train_commands:train_dcgan_command"),
    (train_app, "curve", "models.train_commands:curve_command"),
]

# Group callbacks: the command that runs when the group is called without a subcommand.
GROUP_DEFAULTS: list[tuple[typer.Typer, str]] = [
    (train_app, "models.train_commands:train_command"),
]


def _load(path: str) -> Callable[..., Any] | None:
    """Import "module:function"; None when the module is not part of this install."""
    module_name, function_name = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        logging.getLogger(__name__).debug("command %s unavailable: %s", path, error)
        return None
    function: Callable[..., Any] = getattr(module, function_name)
    return function


def _as_group_default(function: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command so it runs only when its group is called without a subcommand."""

    @functools.wraps(function)
    def callback(ctx: typer.Context, **options: Any) -> None:
        if ctx.invoked_subcommand is None:
            function(**options)

    signature = inspect.signature(function, eval_str=True)  # typer reads the Annotated metadata
    context = inspect.Parameter(
        "ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context
    )
    callback.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[context, *signature.parameters.values()]
    )
    return callback


def _register_commands() -> None:
    """Attach every known command; a module that is not part of this install is skipped."""
    for target, name, path in COMMANDS:
        function = _load(path)
        if function is not None:
            target.command(name)(function)

    for group, path in GROUP_DEFAULTS:
        function = _load(path)
        if function is not None:
            group.callback()(_as_group_default(function))


def main() -> None:
    """Console entry point."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    _register_commands()
    app()


if __name__ == "__main__":
    main()
