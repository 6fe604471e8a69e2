"""What every `loraft` command runs in: its environment for the libraries, the one place a `LoraftError` becomes a
line on stderr and an exit code, the lock on its output folder, and the arguments commands share.

Kept free of torch, pydantic and yaml at import (the config loader is imported when a command reads a config),
so that `loraft --help` and `--version` stay instant: this module and cli.py import in about 0.04 s.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import warnings
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from functools import wraps
from pathlib import Path
from typing import Iterator, List, Optional

import typer

from lora_ft.artifacts.locks import hold
from lora_ft.errors import EXIT_INTERNAL, Interrupted, LoraftError

ConfigArg = typer.Argument(..., exists=False, help="The run's YAML config.", show_default=False)
SetOption = typer.Option(None, "--set", help="Override a key: --set training.max_steps=10 (repeatable).")

# --debug of the invocation now running (set by `main`, reset when it ends; read by `handled`).
DEBUG: ContextVar[bool] = ContextVar("loraft_debug", default=False)

# Set for the duration of one command and restored after it (a test or notebook that calls several keeps its own).
# Expandable CUDA segments: long and variable-length batches otherwise fragment the caching allocator until a run
# that fits on paper dies out of memory; set before CUDA starts, never over the user's own setting.
COMMAND_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
}
QUIET_LOGGERS = ("transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "torch")
# The library warnings a command hides, each by its message (a regex matched at the start) and category: ones we
# looked at and decided say nothing the user can act on. Everything else shows, in the terminal and in the CLI tests,
# so a deprecation of a library internal we override is seen the day it appears.
QUIET_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # PEFT (get_peft_model, peft 0.21) reads transformers 5's deprecated model.is_gradient_checkpointing
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
    # merging an adapter that trains the tied embeddings: PEFT's note on what it does, which merge verifies anyway
    (r"Model has `tie_word_embeddings=True` and a tied layer is part of the adapter", UserWarning),
    (r"Setting `save_embedding_layers` to `True` as embedding layers found", UserWarning),
    # the GGUF quickstart model ships without a config.json beside it (PEFT looks for one to compare vocabularies)
    (r"Could not find a config file in", UserWarning),
)


@contextmanager
def command_environment() -> Iterator[None]:
    """What a command's terminal output needs from the libraries: no advisory chatter, no progress bars, their
    loggers at ERROR and the warnings in QUIET_WARNINGS off, for this command only (nothing global)."""
    added = {k: v for k, v in COMMAND_ENV.items() if k not in os.environ}
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    os.environ.update(added)
    try:
        with warnings.catch_warnings():
            for message, category in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            for name in QUIET_LOGGERS:
                logging.getLogger(name).setLevel(logging.ERROR)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for key in added:
            os.environ.pop(key, None)


def handled(func):
    """Run a command in its environment; LoraftError becomes one line + its exit code, internal errors exit 1."""

    @wraps(func)
    def wrapper(*args, **kwargs):
        try:
            with command_environment():
                return func(*args, **kwargs)
        except LoraftError as exc:
            prefix = "interrupted" if isinstance(exc, Interrupted) else "error"
            for line in str(exc).splitlines():
                typer.echo(f"{prefix}: {_redact(line)}", err=True)  # a config value may hold a token
            raise typer.Exit(exc.exit_code) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as exc:
            if DEBUG.get():
                raise
            typer.echo(f"internal error: {type(exc).__name__}: {_redact(str(exc))} (rerun with --debug for the traceback)", err=True)
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper


def _redact(text: str) -> str:
    from lora_ft.config_io import redact  # lazy: pydantic, yaml (0.1 s), never needed by --help

    return redact(text)


def writer_of(folder: Optional[Path], option: str, verb: str):
    """The exclusive lock on a command's output folder (one writer per folder); a no-op without one."""
    if folder is None:
        return nullcontext()
    return hold(folder, shlex.join(["loraft", verb, *sys.argv[2:]]) if len(sys.argv) > 2 else f"loraft {verb}", what=option)


def read_config(config: Path, overrides: Optional[List[str]]):
    """CONFIG with its --set overrides applied, validated (a bad key is refused here, before anything heavy)."""
    from lora_ft.config_io import load_config  # lazy: pydantic, yaml (0.1 s), never needed by --help

    return load_config(config, overrides or [])
