"""What a data check reports: findings per check with file:line examples, per-split statistics, the held-out overlap
the train summary quotes, and the cleaned copy `--fix` writes. data_check.py runs the checks; this module holds
their typed results, so the train summary and the manifest can read them without the checks' machinery."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape

from lora_ft.artifacts.run_dir import atomic_dir, atomic_write_json, atomic_write_text
from lora_ft.data.pair_checks import PAIR_CHECKS

CHECKS = ("row_schema", "chat_fields", "lengths", "duplicates", "contradictions", "leakage", "near_leakage", "balance",
          "end_of_turn", *PAIR_CHECKS)
SHOWN = 5  # examples kept per finding: enough to recognise the problem, small enough to read
SNIPPET = 100  # characters of a row shown in an example
PUNCTUATION = re.compile(r"[^\w\s]+")


def normalise(text: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed: what counts as 'the same text'."""
    return " ".join(PUNCTUATION.sub(" ", text.lower()).split())


@dataclass(frozen=True)
class Finding:
    check: str  # one of CHECKS
    name: str  # e.g. exact_duplicates
    split: str  # train | eval | train+eval
    count: int
    level: str  # warn | fail
    message: str
    examples: tuple[dict, ...] = ()

    def to_json(self) -> dict:
        return {k: (list(v) if k == "examples" else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class SplitReport:
    name: str
    rows: int
    bad_rows: int
    tokens: dict | None  # min/median/p95/max/total rendered length and trained (in the loss); None when lengths is off
    answers: dict | None  # answer -> count, for short-answer tasks

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class HeldoutOverlap:
    """How many eval rows have a copy in train: the caveat on every held-out figure. Near copies are a
    heuristic (word-bigram Jaccard), so each pair is kept for a person to judge; on templated data most
    rows are near another without being a copy. `near` is None when the near_leakage check is off."""

    eval_rows: int
    exact: int
    near: int | None
    threshold: float
    pairs: tuple[dict, ...] = ()  # every flagged eval row beside the closest train row found, most similar first

    def caveat(self) -> str | None:
        return heldout_caveat(self.to_json())

    def to_json(self) -> dict:
        return {"eval_rows": self.eval_rows, "exact_copies_in_train": self.exact, "near_copies_in_train": self.near,
                "near_threshold": self.threshold}


def heldout_caveat(overlap: dict | None) -> str | None:
    """The line beside held-out figures (train summary, from the manifest's data.heldout_overlap)."""
    if not overlap:
        return None
    exact, near = overlap["exact_copies_in_train"], overlap["near_copies_in_train"] or 0
    if not exact and not near:
        return None
    parts = [f"{exact} exactly"] if exact else []
    parts += [f"{near} nearly (Jaccard >= {overlap['near_threshold']:g})"] if near else []
    return (f"{exact + near} of {overlap['eval_rows']} held-out rows have a copy in train ({', '.join(parts)}): "
            "on those rows the held-out loss measures memory of train, not generalisation")


@dataclass(frozen=True)
class DataCheckResult:
    format: str
    max_seq_length: int
    threshold: float
    splits: tuple[SplitReport, ...]
    findings: tuple[Finding, ...]
    seconds: float
    fix: "FixPlan" = field(repr=False, compare=False)
    overlap: HeldoutOverlap | None = None  # None without an eval split or with both leakage checks off
    end_of_turn: "object" = None  # chat_template.EndOfTurnReport of the train rows; None when the check does not apply

    @property
    def failed(self) -> bool:
        return any(f.level == "fail" for f in self.findings)

    def headline(self) -> str:
        if not self.findings:
            return "data check: no problems found"
        fired = Counter(f.level for f in self.findings)
        worst = "FAILED" if self.failed else "passed with warnings"
        return f"data check {worst}: {fired['fail']} failing, {fired['warn']} warning findings"

    def failure_line(self, config: str = "CONFIG") -> str:
        failing = [f for f in self.findings if f.level == "fail"]
        parts = "; ".join(f"{f.check}: {f.message}" for f in failing[:3])
        checks = sorted({f.check for f in failing})
        return (
            f"data check failed: {parts}; run `loraft data check {config}` for the rows "
            f"(--fix DIR writes a cleaned copy), or set data.checks.{checks[0]}: warn"
        )

    def summary(self) -> str:
        """Rich markup for the terminal; user text is escaped."""
        lines = [f"[bold]format[/] {self.format}   max_seq_length {self.max_seq_length}   ({self.seconds:.1f}s)"]
        for split in self.splits:
            text = f"[bold]{split.name}[/]  {split.rows:,} rows"
            if split.bad_rows:
                text += f", {split.bad_rows} malformed"
            if split.tokens:
                t = split.tokens
                text += f"; tokens min {t['min']} median {t['median']:g} p95 {t['p95']:g} max {t['max']}"
            lines.append(text)
            if split.answers:
                shown = ", ".join(f"{escape(a)!s}: {n}" for a, n in list(split.answers.items())[:6])
                lines.append(f"  answers ({len(split.answers)} distinct): {shown}")
        for f in self.findings:
            colour = "red" if f.level == "fail" else "yellow"
            lines.append(f"[{colour}]{f.level.upper()}[/] {f.check}/{f.name} ({f.split}): {escape(f.message)}")
            for ex in f.examples[:3]:
                lines.append("    " + escape(example_line(ex)))
        lines.append(("[red]" if self.failed else "[green]") + escape(self.headline()) + "[/]")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "ok": not self.failed,
            "format": self.format,
            "max_seq_length": self.max_seq_length,
            "near_duplicate_threshold": self.threshold,
            "seconds": round(self.seconds, 2),
            "splits": [s.to_json() for s in self.splits],
            "findings": [f.to_json() for f in self.findings],
            "heldout_overlap": {**self.overlap.to_json(), "pairs": list(self.overlap.pairs)} if self.overlap else None,
        }

    def to_markdown(self) -> str:
        out = [f"# Data check\n\n{self.headline()}\n", f"Format `{self.format}`, max_seq_length {self.max_seq_length}.\n"]
        out.append("| split | rows | malformed | tokens min | median | p95 | max |\n|---|---|---|---|---|---|---|")
        for s in self.splits:
            t = s.tokens or {}
            out.append(
                f"| {s.name} | {s.rows} | {s.bad_rows} | {t.get('min', '')} | {t.get('median', '')} | {t.get('p95', '')} | {t.get('max', '')} |"
            )
        out.append("\n## Findings\n")
        if not self.findings:
            out.append("None.")
        for f in self.findings:
            out.append(f"### {f.level.upper()} {f.check}: {f.name} ({f.split})\n\n{f.message}\n")
            out.extend(f"- `{example_line(ex)}`" for ex in f.examples)
            out.append("")
        if self.overlap and self.overlap.pairs:
            out.append("## Eval rows with a copy in train\n")
            out.append(f"{self.overlap.caveat()}. Each flagged eval row beside the most similar train row found:\n")
            out.append("| eval row | train row | Jaccard | eval text | train text |\n|---|---|---|---|---|")
            for p in self.overlap.pairs:
                cells = (p["where"], p["in_train"], f"{p['jaccard']:.3f}", p["text"], p["train_text"])
                out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
            out.append("")
        return "\n".join(out) + "\n"

    def write_report(self, folder: Path) -> list[Path]:
        """data_report.json and data_report.md in `folder`, each written atomically."""
        folder = Path(folder)
        atomic_write_json(folder / "data_report.json", self.to_json())
        atomic_write_text(folder / "data_report.md", self.to_markdown())
        return [folder / "data_report.json", folder / "data_report.md"]

    def write_fix(self, folder: Path) -> "FixResult":
        return self.fix.write(Path(folder))


def example_line(ex: dict) -> str:
    if "train_text" in ex:  # a near copy: both rows, so the user can judge
        return f"{ex['where']} ~ {ex['in_train']} (Jaccard {ex['jaccard']:.2f})  eval: {ex['text']}  train: {ex['train_text']}"
    return "  ".join(f"{k}={v}" if k != "where" else str(v) for k, v in ex.items())


# ---------------------------------------------------------------------------------------------
# --fix: cleaned copies, never touching the originals


@dataclass(frozen=True)
class FixResult:
    folder: Path
    kept: dict  # split -> rows written
    removed: dict  # split -> rows dropped
    contradictions: int
    snippet: str

    def summary(self) -> str:
        counts = ", ".join(f"{s}: {self.kept[s]} kept, {self.removed[s]} removed" for s in self.kept)
        return (
            f"cleaned copy written to {self.folder} ({counts}; {self.contradictions} contradictions listed in "
            f"contradictions.jsonl for a person to resolve). To train on it, add to the config:\n{self.snippet}"
        )

    def to_json(self) -> dict:
        return {**self.__dict__, "folder": str(self.folder)}


class FixPlan:
    """What --fix writes, kept from the check: the rows and, per split, which to drop and why."""

    def __init__(self, splits: list, contradictions: list[dict]):  # data_check's splits: rows, examples, removed
        self.splits, self.contradictions = splits, contradictions

    def write(self, folder: Path) -> FixResult:
        kept, removed = {}, {}
        with atomic_dir(folder) as tmp:
            with open(tmp / "removed.jsonl", "w", encoding="utf-8") as log:
                for split in self.splits:
                    keep = [split.row_of[i] for i in range(len(split.examples)) if i not in split.removed]
                    with open(tmp / f"{split.name}.jsonl", "w", encoding="utf-8") as out:
                        for r in keep:
                            out.write(json.dumps(split.rows[r].data, ensure_ascii=False) + "\n")
                    reasons = {split.row_of[i]: why for i, why in split.removed.items()}
                    errors = dict(message.split(": ", 1) for message in split.errors if ": " in message)
                    for r in set(range(len(split.rows))) - set(split.row_of):
                        reasons[r] = f"malformed: {errors.get(split.rows[r].where, 'does not fit the format')}"
                    for r in sorted(reasons):
                        log.write(json.dumps({"split": split.name, "where": split.rows[r].where, "reason": reasons[r],
                                              "row": split.rows[r].data}, ensure_ascii=False) + "\n")
                    kept[split.name], removed[split.name] = len(keep), len(split.rows) - len(keep)
            with open(tmp / "contradictions.jsonl", "w", encoding="utf-8") as out:
                for group in self.contradictions:
                    out.write(json.dumps(group, ensure_ascii=False) + "\n")
            snippet = self._snippet(folder)
            (tmp / "data_config.yaml").write_text(snippet, encoding="utf-8")
        return FixResult(folder, kept, removed, len(self.contradictions), snippet)

    def _snippet(self, folder: Path) -> str:
        lines = ["data:", f"  train: {folder / 'train.jsonl'}"]
        if len(self.splits) == 2:
            # The eval rows are now a file of their own; a fraction would split the cleaned train again.
            lines += [f"  eval: {folder / 'eval.jsonl'}", "  eval_fraction: 0.0"]
        return "\n".join(lines) + "\n"
