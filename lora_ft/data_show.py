"""`loraft data show`: rows exactly as the model sees them, trained tokens told apart from masked ones.

Reads the same prepared data training reads (data/prepared.py), so what it shows is what trains:
in a terminal trained tokens are green and masked ones dim; piped, trained spans sit between
[[ and ]] markers. Where truncation would cut, a |<cut marker shows it.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from lora_ft.config import RunConfig
from lora_ft.data.pairs import detect_preference_format, encode_pair, read_pairs
from lora_ft.data.prepared import PreparedData, prepare_data
from lora_ft.data.rows import IGNORE, load_rows
from lora_ft.errors import DataError


@dataclass(frozen=True)
class ShownRow:
    where: str
    pieces: list[tuple[str, bool]]  # (text, trained) runs, in order
    tokens: int
    trained: int
    cut_at: int | None  # token index where truncation cuts, if it does

    def plain(self) -> str:
        text = "".join(f"[[{t}]]" if trained else t for t, trained in self.pieces)
        return text


@dataclass(frozen=True)
class ShownPair:
    """A preference row: the prompt once, then each answer as trained (only answer tokens are in the loss)."""

    where: str
    prompt: str  # the rendered prompt, as the model sees it before either answer
    prompt_tokens: int
    answers: tuple[tuple[str, str, int, int], ...]  # (side, text in the loss after the limits, tokens kept, tokens full)
    label: bool | None = None  # KTO

    def plain(self) -> str:
        lines = [self.prompt]
        for side, text, kept, full in self.answers:
            cut = f", cut from {full}" if kept < full else ""
            lines.append(f"{side} ({kept} tokens in the loss{cut}): [[{text}]]")
        return "\n".join(lines)


def show_rows(cfg: RunConfig, tokenizer, rows: int = 3, split: str = "train", *, prepared: PreparedData | None = None) -> list:
    if cfg.training.method != "sft":
        train_rows, eval_rows = load_rows(cfg.data, cfg.training.seed)
        chosen_rows = (train_rows if split == "train" else eval_rows or [])[:rows]
        return show_pairs(cfg, tokenizer, chosen_rows) if chosen_rows else []
    prepared = prepared or prepare_data(cfg.data, tokenizer, cfg.training.seed)
    chosen = prepared.train if split == "train" else prepared.eval
    if chosen is None:
        return []
    if set(range(min(rows, len(chosen.rows)))) - set(chosen.row_of):  # a bad row among those shown stops here
        raise chosen.format_errors[0]
    shown = []
    for i in range(min(rows, len(chosen.examples))):
        full = chosen.encoding(i)  # encoded without truncation, to show where the limit cuts
        if isinstance(full, DataError):
            raise full
        limit = cfg.training.max_seq_length
        pieces: list[tuple[str, bool]] = []
        for index, (token, label) in enumerate(zip(full.input_ids, full.labels)):
            if index == limit:
                pieces.append(("|<cut", False))
            text = tokenizer.decode([token])
            trained = label != IGNORE
            if pieces and pieces[-1][1] == trained and pieces[-1][0] != "|<cut":
                pieces[-1] = (pieces[-1][0] + text, trained)
            else:
                pieces.append((text, trained))
        shown.append(
            ShownRow(
                full.where,
                pieces,
                len(full.input_ids),
                sum(1 for label in full.labels if label != IGNORE),
                limit if len(full.input_ids) > limit else None,
            )
        )
    return shown


def show_pairs(cfg: RunConfig, tokenizer, rows) -> list[ShownPair]:
    """Preference rows encoded as training encodes them (data/pairs.py), with the length limits applied."""
    fmt = detect_preference_format(rows, cfg.data)
    shown = []
    for pair in read_pairs(rows, cfg.data, tokenizer, fmt):
        item = encode_pair(pair, tokenizer, max_seq_length=cfg.training.max_seq_length,
                           max_prompt_length=cfg.preference.max_prompt_length)
        answers = tuple((side, tokenizer.decode(ids), len(ids), full) for side, ids, full in item.answers)
        shown.append(ShownPair(item.where, tokenizer.decode(item.prompt_ids), len(item.prompt_ids), answers, item.label))
    return shown


def _print_pair(console, row: ShownPair, color: bool) -> None:
    label = "" if row.label is None else f" (label: {'desirable' if row.label else 'undesirable'})"
    console.print(f"── {row.where}: prompt {row.prompt_tokens} tokens (masked){label}", style="bold")
    if not color:
        console.print(row.plain(), markup=False)
        return
    console.print(row.prompt, style="dim", markup=False)
    table = Table(show_lines=False, expand=True)
    cells = []
    for side, text, kept, full in row.answers:
        table.add_column(f"{side}: {kept} tokens in the loss" + (f" (cut from {full})" if kept < full else ""))
        cells.append(f"[bold green]{escape(text)}[/]")
    table.add_row(*cells)
    console.print(table)


def print_rows(shown: list, *, color: bool) -> None:
    console = Console(force_terminal=color, no_color=not color, highlight=False, soft_wrap=True)
    for row in shown:
        if isinstance(row, ShownPair):
            _print_pair(console, row, color)
            continue
        cut = f", cut at token {row.cut_at}" if row.cut_at is not None else ""
        console.print(f"── {row.where}: {row.tokens} tokens, {row.trained} trained{cut}", style="bold")
        if color:
            text = Text()
            for piece, trained in row.pieces:
                text.append(piece, style="bold green" if trained else ("bold red" if piece == "|<cut" else "dim"))
            console.print(text)
        else:
            console.print(row.plain(), markup=False)
    if color:
        console.print("green: in the loss · dim: masked", style="italic")
    else:
        console.print("[[...]]: in the loss; everything else is masked", markup=False)
