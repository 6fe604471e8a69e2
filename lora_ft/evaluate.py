"""Evaluation stage: does the adapter beat its base on the task, and what got worse?

Reads a finished run folder (adapter, saved tokenizer/template, config.yaml) and data with reference
answers; writes nothing unless asked (`--out DIR`: report.json, report.md, report.png, atomically; rendered by
eval_report.py).
Base and adapter are measured in the same process on exactly the same tokens (the adapter is
disabled for the base), so every delta is the adapter's doing.

- Task quality: held-out loss/perplexity (token-weighted, as in training) and generation metrics on
  the reference answers: exact match, contains, regex, JSON valid, JSON field equality, ROUGE-L,
  and "stops" (the share of answers that end with an end-of-turn/EOS token before the length limit); and,
  on the references, the probability of stopping where each answer ends and the share of answers where
  stopping is the most likely next token (stop_probability, stop_is_top1).
- Regressions: per-example loss of the reference answers of a "base capability" set (the user's, or
  lora_ft/resources/regression_default.jsonl: short general questions SmolLM2-135M-Instruct answers
  correctly). Loss on references is the gate because it is smooth and cheap and does not hinge on one
  greedy token; generation match is reported beside it, with the worst regressions and both outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from rich.console import Console

from lora_ft.config import DataSource, DataSpec
from lora_ft.data.encoding import Example
from lora_ft.data.pairs import pair_rows_for_eval
from lora_ft.data.rows import detect_format, load_rows, map_fields, read_rows
from lora_ft.errors import LoraftError
from lora_ft.eval_report import TIE_NATS, EvalReport
from lora_ft.metrics import DEFAULT_MAX_REGRESSION, GENERATION_METRICS, example_losses, loss_summary, score_generation
from lora_ft.model.stop_tokens import stop_score
from lora_ft.serving.inference import BASE, GenerationSettings, load_for_inference
from lora_ft.training.preference import pair_score

PREFERENCE_METRICS = ("preference_accuracy", "preference_margin")  # on preference pairs (training/preference.py)

DEFAULT_REGRESSION = Path(__file__).parent / "resources" / "regression_default.jsonl"


# ---------------------------------------------------------------------------------------------
# Items: a data row as the model sees it (prompt ids for generation, labelled ids for loss)


@dataclass(frozen=True)
class EvalItem:
    where: str
    prompt: str  # the last user message (or plain prompt), for reports
    prompt_ids: list[int] | None  # None for plain-text rows: loss only
    reference: str | None
    encoded: object | None  # data.Encoded with the reference in the labels; None if nothing is trained
    regex: str | None = None
    answer: str | None = None  # the row's optional "answer" field: what `contains` looks for


def build_items(rows, spec, conversation, *, max_seq_length: int, regex: str | None = None) -> list[EvalItem]:
    """Rows -> items, rendered exactly as training renders them: the run's conversation (row rule, system prompt,
    template, masking) with the data settings' field mapping, format and train_on."""
    if not rows:
        return []
    fmt = detect_format(rows, spec)
    items = []
    for row in rows:
        example = conversation.example(map_fields(row.data, spec.fields), row.where, fmt)
        row_regex = row.data.get("regex") if isinstance(row.data.get("regex"), str) else regex
        answer = row.data.get("answer") if isinstance(row.data.get("answer"), str) else None
        if example.text is not None:
            encoded = conversation.encode(example, train_on=spec.train_on, max_seq_length=max_seq_length)
            items.append(EvalItem(row.where, example.text[:200], None, None, encoded if encoded.trained_tokens else None))
            continue
        messages = list(example.messages)
        last = max(i for i, m in enumerate(messages) if m["role"] in ("assistant", "completion"))
        context, reference = messages[:last], messages[last]["content"]
        through = Example(tuple(messages[: last + 1]), None, row.where, example.tools)
        encoded = conversation.encode(through, train_on=spec.train_on, max_seq_length=max_seq_length)
        items.append(
            EvalItem(
                row.where, context[-1]["content"], conversation.prompt_ids(context), reference,
                encoded if encoded.trained_tokens else None, row_regex, answer,
            )
        )
    return items


# ---------------------------------------------------------------------------------------------
# The stage


@dataclass(frozen=True)
class Gates:
    """CI thresholds: minimums on the adapter's task metrics, a maximum on the regression."""

    minimums: dict[str, float] = field(default_factory=dict)  # metric -> lowest acceptable adapter value
    max_regression: float = DEFAULT_MAX_REGRESSION  # nats/token, mean per-example loss increase on the regression set

    def __post_init__(self):
        known = (*GENERATION_METRICS, *PREFERENCE_METRICS)
        unknown = set(self.minimums) - set(known)
        if unknown:
            raise LoraftError(f"--min-*: unknown metric {', '.join(sorted(unknown))}; known: {', '.join(known)}")


@dataclass(frozen=True)
class EvalSettings:
    max_new_tokens: int | None = None  # None: 16 + twice the longest reference, at most 512 (per data set)
    batch_size: int = 8
    regex: str | None = None
    worst: int = 5


def evaluate(
    adapter: str | Path,
    *,
    base: str | None = None,
    data: Sequence[str | Path] = (),
    regression: Sequence[str | Path] | None = None,
    settings: EvalSettings = EvalSettings(),
    gates: Gates = Gates(),
    force: bool = False,
    full_precision_base: bool = False,
    inference=None,
    progress=None,
) -> EvalReport:
    """Base vs base+adapter on the task data (default: the run's eval split) and on the regression set.

    `regression=None` uses the shipped default set; an empty list skips the regression check.
    `inference` reuses an already loaded model (tests, notebooks); by default one is loaded here.
    A QLoRA run is scored on its base quantized as in training, so eval's figures are the train summary's;
    `full_precision_base` scores it on the full-precision base that merge, export and serve use instead.
    """
    if inference is None:
        _say(progress, f"loading the base and the adapter in {adapter} ...")
        inference = load_for_inference(adapter, base, force, as_trained=not full_precision_base)
    wanted = Path(adapter).expanduser().resolve()
    label = next((name for name, run in inference.runs.items() if run.path == wanted), inference.labels[0])
    run = inference.runs[label]
    conversation = inference.conversation(label)
    max_seq_length = run.config.training.max_seq_length if run.config else 2048
    task_sources, task_rows = _task_rows(run, data)
    task_spec = _data_spec(run, task_sources[0])
    # Preference pairs: accuracy and margin on the pairs; loss and generations against the chosen answers.
    pairs = pair_rows_for_eval(task_rows, task_spec, conversation.tokenizer, max_seq_length=max_seq_length)
    if pairs is not None:
        task_rows = pairs[0]
    items = build_items(task_rows, task_spec, conversation, max_seq_length=max_seq_length, regex=settings.regex)
    task = _compare(inference, label, items, settings, progress, "task")
    if pairs is not None:
        task["metrics"] = {**_preference_metrics(inference, label, pairs[1], settings), **task["metrics"]}
    task["sources"] = task_sources

    regression_report = None
    regression_files = [DEFAULT_REGRESSION] if regression is None else list(regression)
    if regression_files:
        rows = _read_all(regression_files)
        # General-capability prompts are asked as a user would, without the task's system prompt.
        spec = DataSpec(train={"path": str(regression_files[0])})
        reg_items = build_items(rows, spec, replace(conversation, system_prompt=None), max_seq_length=max_seq_length)
        regression_report = _compare(inference, label, reg_items, settings, progress, "regression", worst=settings.worst)
        regression_report["sources"] = [str(p) for p in regression_files]

    failures = _gate(task, regression_report, gates)
    return EvalReport(
        adapter=str(run.path),
        base=inference.base_name,
        base_matches=inference.base_matches,
        settings={"batch_size": settings.batch_size, "max_new_tokens": settings.max_new_tokens, "greedy": True, "regex": settings.regex,
                  "base_weights": getattr(inference, "base_weights", "full precision")},
        task=task,
        regression=regression_report,
        failures=failures,
        gates={"minimums": dict(gates.minimums), "max_regression": gates.max_regression},
    )


def _task_rows(run, data: Sequence[str | Path]):
    if data:
        return [str(p) for p in data], _read_all(data)
    cfg = run.config
    if cfg is None or cfg.data is None:
        raise LoraftError(f"--data: {run.path} has no loraft config.yaml to take the eval split from; pass --data FILE")
    if cfg.data.eval is not None:
        return [cfg.data.eval.path], read_rows(cfg.data.eval)
    if cfg.data.eval_fraction > 0:
        # The same seeded split training held out (data.load_rows), so eval never sees training rows.
        _, held = load_rows(cfg.data, cfg.training.seed)
        return [f"{cfg.data.train.path} (held-out {cfg.data.eval_fraction:g}, seed {cfg.training.seed})"], held
    raise LoraftError("--data: the run's config has no eval data (data.eval or data.eval_fraction); pass --data FILE")


def _read_all(paths) -> list:
    rows = []
    for path in paths:
        if not Path(path).expanduser().is_file():
            raise LoraftError(f"data file not found: {path}")
        found = read_rows(DataSource(path=str(path)))
        if not found:
            raise LoraftError(f"{path}: holds no rows")
        rows += found
    return rows


def _data_spec(run, source: str):
    """The run's data settings (field mapping, system prompt, masking) for any eval file."""
    if run.config is not None and run.config.data is not None:
        return run.config.data
    return DataSpec(train={"path": source})


def _compare(inference, label: str, items: list[EvalItem], settings: EvalSettings, progress, what: str, worst: int = 0) -> dict:
    """Loss and generation metrics of base and adapter on the same items; per-example rows for the report."""
    tokenizer = inference.tokenizer(label)
    scored = [i for i in items if i.encoded is not None]
    _say(progress, f"{what}: loss of base and adapter on {len(scored)} of {len(items)} rows ...")
    losses = {}
    for who in (BASE, label):
        with inference.use(who):
            losses[who] = example_losses(inference.model, [i.encoded for i in scored], pad_token_id=tokenizer.pad_token_id, batch_size=settings.batch_size)
    metrics: dict[str, dict] = {}
    if scored:
        b, a = loss_summary(losses[BASE]), loss_summary(losses[label])
        metrics["loss"] = {"base": b["loss"], "adapter": a["loss"], "delta": a["loss"] - b["loss"], "n": len(scored)}
        metrics["perplexity"] = {"base": b["perplexity"], "adapter": a["perplexity"], "delta": a["perplexity"] - b["perplexity"], "n": len(scored)}
        if what == "task":
            metrics.update(_stop_metrics(inference, label, scored, settings))

    generated = [i for i in items if i.prompt_ids is not None and i.reference is not None]
    outputs: dict[str, list] = {}
    if generated:
        gen = GenerationSettings(max_new_tokens=settings.max_new_tokens or _default_budget(tokenizer, generated), batch_size=settings.batch_size)
        for who in (BASE, label):
            outputs[who] = inference.generate([i.prompt_ids for i in generated], gen, who, progress=progress)
        per_metric: dict[str, dict[str, list[float]]] = {}
        for who in (BASE, label):
            for item, out in zip(generated, outputs[who]):
                for name, value in score_generation(out.text, out.stopped, item.reference, item.regex, item.answer).items():
                    per_metric.setdefault(name, {BASE: [], label: []})[who].append(value)
        for name in GENERATION_METRICS:
            if name in per_metric:
                base_mean, adapter_mean = _mean(per_metric[name][BASE]), _mean(per_metric[name][label])
                metrics[name] = {"base": base_mean, "adapter": adapter_mean, "delta": adapter_mean - base_mean, "n": len(per_metric[name][BASE])}
        metrics["mean_new_tokens"] = {
            "base": _mean([o.new_tokens for o in outputs[BASE]]),
            "adapter": _mean([o.new_tokens for o in outputs[label]]),
            "delta": _mean([o.new_tokens for o in outputs[label]]) - _mean([o.new_tokens for o in outputs[BASE]]),
            "n": len(generated),
        }

    examples = _examples(items, scored, losses, generated, outputs, label)
    report = {"rows": len(items), "metrics": metrics, "examples": examples}
    if what == "regression":
        deltas = [e["delta"] for e in examples if e.get("delta") is not None]
        report.update(
            mean_delta=_mean(deltas),
            deltas=deltas,
            wins=sum(1 for d in deltas if d < -TIE_NATS),
            losses=sum(1 for d in deltas if d > TIE_NATS),
            ties=sum(1 for d in deltas if abs(d) <= TIE_NATS),
            worst=sorted((e for e in examples if e.get("delta") is not None and e["delta"] > TIE_NATS), key=lambda e: -e["delta"])[:worst],
        )
    return report


def _preference_metrics(inference, label: str, encoded, settings: EvalSettings) -> dict:
    """Held-out preference accuracy (length-normalised log p of chosen above rejected) and mean margin, base and adapter."""
    scores = {}
    for who in (BASE, label):
        with inference.use(who):
            scores[who] = pair_score(inference.model, encoded, batch_size=settings.batch_size)
    if scores[label] is None:
        return {}
    b, a = scores[BASE], scores[label]
    return {
        "preference_accuracy": {"base": b.accuracy, "adapter": a.accuracy, "delta": a.accuracy - b.accuracy, "n": a.pairs},
        "preference_margin": {"base": b.mean_margin, "adapter": a.mean_margin, "delta": a.mean_margin - b.mean_margin, "n": a.pairs},
    }


def _say(progress, line: str) -> None:
    """One line per stage on a terminal (the generation stages add a bar): long evaluations never sit silent.
    Nothing when stderr is piped or captured, where an error stays the one line it is."""
    if progress is False:
        return
    console = progress if progress is not None else Console(stderr=True)
    if console.is_terminal:
        console.print(line, highlight=False)


def _stop_metrics(inference, label: str, scored: list[EvalItem], settings: EvalSettings) -> dict:
    """How likely base and adapter are to stop where each reference answer ends (stop_tokens.stop_score)."""
    tokenizer = inference.tokenizer(label)
    found = {}
    for who in (BASE, label):
        with inference.use(who):
            found[who] = stop_score(inference.model, [i.encoded for i in scored], inference.conversation(label).stop_ids,
                                    pad_token_id=tokenizer.pad_token_id, batch_size=settings.batch_size)
    if found[label] is None:
        return {}
    b, a = found[BASE], found[label]
    return {
        "stop_probability": {"base": b.mean_probability, "adapter": a.mean_probability,
                             "delta": a.mean_probability - b.mean_probability, "n": a.answers},
        "stop_is_top1": {"base": b.top1_share, "adapter": a.top1_share, "delta": a.top1_share - b.top1_share, "n": a.answers},
    }


def _examples(items, scored, losses, generated, outputs, label) -> list[dict]:
    by_where = {i.where: {"where": i.where, "prompt": i.prompt, "reference": i.reference} for i in items}
    for item, b, a in zip(scored, losses.get(BASE, []), losses.get(label, [])):
        entry = by_where[item.where]
        entry["base_loss"], entry["adapter_loss"] = b[0] / max(b[1], 1), a[0] / max(a[1], 1)
        entry["delta"] = entry["adapter_loss"] - entry["base_loss"]
    for index, item in enumerate(generated):
        entry = by_where[item.where]
        for who, key in ((BASE, "base"), (label, "adapter")):
            out = outputs[who][index]
            entry[f"{key}_output"], entry[f"{key}_stopped"] = out.text, out.stopped
            entry[f"{key}_scores"] = score_generation(out.text, out.stopped, item.reference, item.regex, item.answer)
    return list(by_where.values())


def _default_budget(tokenizer, items: list[EvalItem]) -> int:
    """Room for the longest reference twice over: a longer answer cannot match, and the base rambles."""
    longest = max(len(tokenizer(i.reference, add_special_tokens=False)["input_ids"]) for i in items)
    return min(512, 16 + 2 * longest)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _gate(task: dict, regression: dict | None, gates: Gates) -> list[str]:
    failures = []
    for name, minimum in gates.minimums.items():
        row = task["metrics"].get(name)
        if row is None:
            failures.append(f"--min-{name.replace('_', '-')} {minimum:g}: the task data has no rows this metric applies to")
        elif row["adapter"] < minimum:
            failures.append(f"{name} {row['adapter']:.4f} is below --min-{name.replace('_', '-')} {minimum:g}")
    if regression and regression.get("deltas") and regression["mean_delta"] > gates.max_regression:
        failures.append(
            f"regression: mean loss on the regression set rose by {regression['mean_delta']:.4f} nats/token "
            f"(worse on {regression['losses']} of {len(regression['deltas'])} rows), above --max-regression {gates.max_regression:g}"
        )
    return failures
