"""`loraft generate`: JSONL prompts in, JSONL answers out, through the inference stage (serving/inference.py)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from lora_ft.artifacts.run_dir import atomic_write_text
from lora_ft.config import DataSource
from lora_ft.data.rows import read_rows
from lora_ft.errors import LoraftError
from lora_ft.serving.inference import Generation, GenerationSettings, Inference


# ---------------------------------------------------------------------------------------------
# `loraft generate`: JSONL in, JSONL out


@dataclass(frozen=True)
class GenerateResult:
    rows: list[dict]
    labels: list[str]
    out: Path | None
    settings: GenerationSettings

    def summary(self) -> str:
        stops = {label: sum(r["outputs"][label]["stopped"] for r in self.rows) for label in self.labels}
        lines = [f"{len(self.rows)} prompts, {len(self.labels)} model(s): " + ", ".join(self.labels)]
        lines += [f"stopped before {self.settings.max_new_tokens} new tokens: " + ", ".join(f"{k} {v}/{len(self.rows)}" for k, v in stops.items())]
        if self.out:
            lines.append(f"written to {self.out}")
        return "\n".join(lines)

    def side_by_side(self, limit: int = 20) -> str:
        blocks = []
        for row in self.rows[:limit]:
            block = [f"### {row['where']}", f"prompt: {row['prompt']}"]
            for label in self.labels:
                out = row["outputs"][label]
                block.append(f"[{label}]{'' if out['stopped'] else ' (cut at max_new_tokens)'} {out['text']}")
            blocks.append("\n".join(block))
        return "\n\n".join(blocks)

    def to_json(self) -> dict:
        return {"labels": self.labels, "settings": self.settings.to_json(), "rows": self.rows}


def generate_file(
    inference: Inference, prompts_file: Path, settings: GenerationSettings, *, labels: Sequence[str],
    out: Path | None = None, progress=None,
) -> GenerateResult:
    """Read prompt rows, generate with each label (base and/or adapters), write one JSONL row per prompt."""
    rows = read_rows(DataSource(path=str(prompts_file)))
    if not rows:
        raise LoraftError(f"--prompts: {prompts_file} holds no rows")
    results = []
    per_label: dict[str, list[Generation]] = {}
    prompts_shown = []
    for label in labels:
        conversation = inference.conversation(label)
        ids = []
        for row in rows:
            messages, _ = conversation.prompt(row.data, row.where)
            ids.append(conversation.prompt_ids(messages))
            if label == labels[0]:
                prompts_shown.append(messages[-1]["content"])
        per_label[label] = inference.generate(ids, settings, label, progress=progress)
    for index, row in enumerate(rows):
        outputs = {label: asdict(per_label[label][index]) for label in labels}
        results.append({"where": row.where, "prompt": prompts_shown[index], "input": row.data, "outputs": outputs})
    if out is not None:
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
    return GenerateResult(results, list(labels), out, settings)
