"""One advice line as a typed record: what training.advice writes, the manifest stores and inspect shows.

Kept apart from advice.py so the manifest can type it without importing the rules (and what they import).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from lora_ft.config import AdviceRule

Level = Literal["ok", "info", "warn"]


class Finding(BaseModel):
    """One advice line: what was found, why (with its source), and the value and `--set` that would apply it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: AdviceRule = Field(description="The rule; `advice.off: [name]` silences it.")
    level: Level
    when: Literal["before", "after"] = "before"
    what: str
    why: str
    source: str
    value: float | int | str | None = Field(None, description="The configured value the rule read.")
    suggested: float | int | str | None = Field(None, description="What the rule suggests instead (None: keep).")
    set: tuple[str, ...] = Field((), description="key=value overrides that apply the suggestion (--set each).")

    def line(self) -> str:
        fix = "  ->  " + " ".join(f"--set {s}" for s in self.set) if self.set else ""
        return f"{self.level.upper():<4} {self.name}: {self.what}{fix}"

    def lines(self) -> list[str]:
        """The line, and for a warning or a note its reason and source."""
        return [self.line()] + ([f"     why: {self.why} [{self.source}]"] if self.level != "ok" else [])
