"""`loraft data`: look at training data before spending GPU time on it (`data show`, `data check`).

The two commands read the run's config as train reads it and render or check its data exactly as train will
feed it; neither loads model weights (`show` loads the tokenizer only).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from lora_ft.cli_common import ConfigArg, SetOption, handled, read_config
from lora_ft.errors import ConfigError, DataError

data_app = typer.Typer(no_args_is_help=True, help="Look at training data before spending GPU time on it.")


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
    from lora_ft.data_show import print_rows, show_rows  # lazy: pydantic, yaml, rich (0.15 s)
    from lora_ft.model.loading import load_tokenizer, resolve_model_source  # lazy: torch (seconds), after the config is read

    cfg = read_config(config, set_)
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
    from rich.console import Console  # lazy: rich (0.04 s), not needed by --help

    from lora_ft.data_check import check_data  # lazy: pydantic, yaml (0.3 s)

    console = Console(soft_wrap=True)  # a finding's file:line stays one line, whatever the terminal's width
    result = check_data(read_config(config, set_), console=console)
    console.print(result.summary())
    if report is not None:
        console.print(f"report: {', '.join(str(p) for p in result.write_report(report))}")
    if fix is not None:
        console.print(result.write_fix(fix).summary(), markup=False)
    if result.failed:
        raise DataError(result.failure_line(str(config)))
