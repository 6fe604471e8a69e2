"""The `loraft` command line: each command picks a library function, calls it, prints its summary.

Heavy imports (torch, transformers) happen inside commands so `loraft --help` is instant. A
`LoraftError` becomes one line on stderr and its exit code (2 for user errors); `--debug` shows
the traceback of anything else.
"""

from __future__ import annotations

import os
import sys
from functools import wraps
from pathlib import Path
from typing import List, Optional

import typer

from . import __version__
from .errors import EXIT_INTERNAL, LoraftError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Fine-tune causal language models with LoRA and QLoRA from one YAML file.",
)
data_app = typer.Typer(no_args_is_help=True, help="Look at training data before spending GPU time on it.")
app.add_typer(data_app, name="data")

STATE = {"debug": False}

ConfigArg = typer.Argument(..., exists=False, help="The run's YAML config.", show_default=False)
SetOption = typer.Option(None, "--set", help="Override a key: --set training.max_steps=10 (repeatable).")


def _version(value: bool):
    if value:
        typer.echo(f"loraft {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for internal errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    STATE["debug"] = debug
    _quiet_libraries()


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="(torch|transformers|peft|trl)")

    for name in ("transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)


def handled(func):
    """Turn LoraftError into one line + its exit code; internal errors into exit 1."""

    @wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except LoraftError as exc:
            from .config import redact
            from .errors import Interrupted

            prefix = "interrupted" if isinstance(exc, Interrupted) else "error"
            for line in str(exc).splitlines():
                typer.echo(f"{prefix}: {redact(line)}", err=True)  # a config value may hold a token
            raise typer.Exit(exc.exit_code) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as exc:
            if STATE["debug"]:
                raise
            from .config import redact

            typer.echo(f"internal error: {type(exc).__name__}: {redact(str(exc))} (rerun with --debug for the traceback)", err=True)
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper


def _load(config: Path, overrides: Optional[List[str]]):
    from .config import load_config

    return load_config(config, overrides or [])


@app.command()
@handled
def train(
    config: Path = ConfigArg,
    set_: Optional[List[str]] = SetOption,
    resume: bool = typer.Option(
        False, "--resume", help="Continue the unfinished run in output_dir (also automatic); fail if there is none."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard the run (finished or not) in output_dir."),
    gpus: int = typer.Option(1, "--gpus", min=1, help="Train on N GPUs through accelerate (distributed: section)."),
    cpu: bool = typer.Option(False, "--cpu", help="With --gpus N: run N processes on the CPU (gloo), to test a setup."),
):
    """Train a LoRA/QLoRA adapter as CONFIG describes and write it to output_dir.

    An unfinished run of the same config in output_dir continues from its last complete checkpoint.
    Exit codes: 0 done, 2 bad input, 1 internal error, 130/143 interrupted (Ctrl-C/SIGTERM) after saving.

    Example: loraft train recipes/quickstart.yaml --set training.max_steps=20
    """
    import shlex

    from .distributed import is_main_process, launch, world_size
    from .train import train as run_training

    cfg = _load(config, set_)
    if gpus > 1 and world_size() == 1:
        argv = ["train", str(config), *[f"--set={item}" for item in set_ or []]]
        argv += ["--resume"] * resume + ["--overwrite"] * overwrite
        raise typer.Exit(launch(config, argv, cfg, gpus, cpu=cpu))
    # What the user typed, quoted back in interruption and resume messages.
    launched = ["--gpus", str(world_size())] + ["--cpu"] * cpu if world_size() > 1 else []
    command = shlex.join(["loraft", "train", str(config), *[a for item in set_ or [] for a in ("--set", item)], *launched])
    result = run_training(cfg, resume=resume, overwrite=overwrite, command=command)
    if is_main_process():
        typer.echo(result.summary())


@app.command()
@handled
def validate(config: Path = ConfigArg, set_: Optional[List[str]] = SetOption):
    """Check CONFIG as train would, without loading weights; print the resolved config and estimates.

    Example: loraft validate configs/llama8b.yaml
    """
    from .config import config_to_yaml
    from .train import preflight

    cfg = _load(config, set_)
    check = preflight(cfg, need_data=False)
    typer.echo(config_to_yaml(cfg).rstrip())
    typer.echo("---")
    typer.echo(check.summary())
    typer.echo("ok: config is valid")


@data_app.command("show")
@handled
def data_show(
    config: Path = ConfigArg,
    rows: int = typer.Option(3, "--rows", "-n", help="How many rows to show."),
    split: str = typer.Option("train", "--split", help="train or eval."),
    set_: Optional[List[str]] = SetOption,
):
    """Print rows as the model sees them: the rendered template, trained tokens marked, token counts, cuts.

    Example: loraft data show recipes/quickstart.yaml --rows 2
    """
    from .config import ConfigError
    from .data_show import print_rows, show_rows
    from .model import load_tokenizer, resolve_model_source

    cfg = _load(config, set_)
    if cfg.data is None:
        raise ConfigError("data: missing; add data.train: path/to/train.jsonl")
    tokenizer = load_tokenizer(cfg.model, resolve_model_source(cfg.model))
    print_rows(show_rows(cfg, tokenizer, rows, split), color=sys.stdout.isatty())


@data_app.command("check")
@handled
def data_check(
    config: Path = ConfigArg,
    report: Optional[Path] = typer.Option(None, "--report", help="Write data_report.json and data_report.md to this folder."),
    fix: Optional[Path] = typer.Option(None, "--fix", help="Write cleaned copies of the data to this new folder."),
    set_: Optional[List[str]] = SetOption,
):
    """Check CONFIG's train and eval data as train will feed it: malformed rows, token lengths, duplicates,
    contradictions, eval rows leaked from train, label balance. Exit 0 when no check set to fail in
    data.checks fires, 2 otherwise (the report and the cleaned copy are written either way).

    Example: loraft data check recipes/quickstart.yaml --report runs/quickstart-data
    """
    from rich.console import Console

    from .data_check import check_data
    from .errors import DataError

    console = Console()
    result = check_data(_load(config, set_), console=console)
    console.print(result.summary())
    if report is not None:
        console.print(f"report: {', '.join(str(p) for p in result.write_report(report))}")
    if fix is not None:
        console.print(result.write_fix(fix).summary(), markup=False)
    if result.failed:
        raise DataError(result.failure_line(str(config)))


# ---------------------------------------------------------------------------------------------
# merge


@app.command()
@handled
def merge(
    adapter: Path = typer.Option(..., "--adapter", help="A finished run folder (or any PEFT LoRA adapter folder)."),
    out: Path = typer.Option(..., "--out", help="Folder to create for the merged model (must not exist)."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model; default: the one recorded in the adapter."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the base's), bfloat16, float16 or float32."),
    force: bool = typer.Option(False, "--force", help="Merge even if the base is not the adapter's own (recorded)."),
    qlora_base: str = typer.Option(
        "original", "--qlora-base", help="QLoRA adapters: merge into the original weights or the dequantized 4-bit ones (CUDA)."
    ),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the logits check (the per-module check always runs)."),
):
    """Merge a LoRA adapter into its base: an ordinary model folder that loads without PEFT, verified.

    Example: loraft merge --adapter runs/quickstart --out merged/quickstart
    """
    from .merge import DTYPES, merge as run_merge

    if dtype != "auto" and dtype not in DTYPES:
        raise LoraftError(f"--dtype: {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    result = run_merge(adapter, out, base=base, dtype=dtype, force=force, qlora_base=qlora_base, verify=not no_verify)
    typer.echo(result.summary())


@app.command("inspect")
@handled
def inspect_command(
    adapter_dir: Path = typer.Argument(
        ..., metavar="ADAPTER_DIR", help="A run folder (or any PEFT LoRA adapter folder).", show_default=False
    ),
    against: Optional[Path] = typer.Option(None, "--against", help="A second adapter to compare subspaces with."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write inspect.json and PNG charts to this folder."),
    energy: float = typer.Option(0.9, "--energy", help="Share of the squared spectrum that defines effective rank."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model for ||W|| (default: the one the run recorded)."),
):
    """Show what an adapter learned per layer and module type, and whether its rank was the right size.

    Example: loraft inspect runs/quickstart --report reports/quickstart
    """
    from .rank_diagnostics import inspect_adapter
    from .rank_report import write_report

    result = inspect_adapter(adapter_dir, against=against, base=base, energy=energy)
    if report is not None:
        write_report(result, report)
    typer.echo(result.summary())
    if report is not None:
        typer.echo(f"report written to {report}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
