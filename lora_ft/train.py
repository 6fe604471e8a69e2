"""`loraft train`: config -> pre-flight -> run folder -> base + LoRA -> TRL trainer -> fit -> held-out scores -> a
finished run folder. Each stage lives under lora_ft/training/ and returns a frozen result the next ones read:

  preflight.py   everything checked before weights load (what `validate` prints), with the prepared data
  fit.py         the run folder opened and recorded, the model loaded, trainer.train with a resumable state
  sft.py         our schema meets TRL: SFTConfig and the Trainer (the trainer-building stage)
  finish.py      held-out scores, adapter, card, curve and the typed manifest last
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from lora_ft.artifacts.locks import hold
from lora_ft.artifacts.manifests import RunManifest
from lora_ft.artifacts.run_dir import METRICS
from lora_ft.config import RunConfig
from lora_ft.data.check_report import heldout_caveat
from lora_ft.training.distributed import is_main_process
from lora_ft.training.preflight import Preflight, preflight


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    manifest: RunManifest | None  # None on ranks other than 0: only rank 0 writes the run folder
    scores: dict = field(default_factory=dict)
    stop: dict = field(default_factory=dict)  # stop-token probability at the end of held-out answers, base and adapter
    notes: tuple[str, ...] = ()  # what serving the adapter takes (the pre-flight's deployment notes)
    preference: dict | None = None  # preference runs: method, reference, chain, held-out preference accuracy

    def summary(self) -> str:
        lines = [f"adapter written to {self.run_dir}"]
        m = self.manifest
        if m is not None and m.metrics.train_loss is not None:
            lines.append(f"train loss      {m.metrics.train_loss:.4f} after {m.metrics.steps} steps in {m.wall_seconds:.0f}s")
            lines.append(f"speed           {speed_line(self.run_dir, m.metrics.peak_gpu_memory_gib)}")
        base, tuned = self.scores.get("base"), self.scores.get("adapter")
        if self.preference is not None:
            from lora_ft.training import preference  # lazy: ~6 s (torch, transformers, trl); not before train's 0.6 s refusals

            lines += preference.preference_summary(self.preference.get("heldout") or {})
        elif base and tuned:
            lines.append(
                f"held-out loss   base {base['loss']:.4f}  ->  adapter {tuned['loss']:.4f}   "
                f"(perplexity {base['perplexity']:.2f} -> {tuned['perplexity']:.2f}, {tuned['rows']} rows)"
            )
        elif not base:
            lines.append("held-out loss   (no eval data: set data.eval or data.eval_fraction)")
        if base and m is not None and (caveat := heldout_caveat(m.data.heldout_overlap)):
            lines.append(f"caveat          {caveat}")
        if base and m is not None and m.base_model.quantization is not None:
            # `loraft eval` scores a QLoRA run on this same 4-bit base (AdapterRun.resolve_base(as_trained=True));
            # merge, export, generate and serve compute on the full-precision base, where the figures move.
            lines.append(f"note            held-out figures here are on the {m.base_model.quantization.bits}-bit base the "
                         "adapter trained on, as `loraft eval` scores it; merge and serve compute on the full-precision "
                         "base: `loraft eval --full-precision-base` measures the adapter there")
        if self.stop.get("adapter"):
            b, a = self.stop["base"], self.stop["adapter"]
            lines.append(
                f"stops           p(stop) at the end of held-out answers: base {b['mean_probability']:.3f} -> adapter "
                f"{a['mean_probability']:.3f}; most likely next token in {b['top1_share']:.0%} -> {a['top1_share']:.0%} "
                f"of {a['answers']} answers"
            )
        if self.stop.get("warning"):
            lines.append(f"warning         {self.stop['warning']}")
        lines += [f"deploy          {note}" for note in self.notes]
        if m is not None and m.advice is not None:
            lines += [f"advice          {line}" for f in m.advice.after for line in f.lines()]
        return "\n".join(lines)

    def to_json(self) -> dict:
        manifest = self.manifest.model_dump(mode="json") if self.manifest is not None else None
        return {"run_dir": str(self.run_dir), "scores": self.scores, "stop": self.stop, "preference": self.preference,
                "manifest": manifest, "notes": list(self.notes)}


def speed_line(run_dir: Path, peak_gib: float | None) -> str:
    """Mean training tokens/s (metrics.jsonl's last record) next to the peak GPU memory."""
    from lora_ft.training.progress import read_metrics  # lazy: ~6 s (torch, transformers, trl); not before train's 0.6 s refusals

    rates = [r["tokens_per_s_mean"] for r in read_metrics(run_dir / METRICS) if "tokens_per_s_mean" in r]
    rate = f"{rates[-1]:,.0f} tok/s (mean)" if rates else "tok/s not measured"
    return f"{rate}, peak GPU memory " + (f"{peak_gib:.2f} GiB" if peak_gib is not None else "n/a (no CUDA)")


def train(
    cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, console=None, command: str = "loraft train CONFIG"
) -> TrainResult:
    """Train as `cfg` says. An unfinished run of the same config in output_dir is continued from its
    last complete checkpoint (`resume=True` insists there is one). `command` is what the user typed,
    quoted back in interruption and resume messages. One writer per run folder: rank 0 holds the folder's
    lock from before the first check to the end, so a second `loraft train` on it exits 2 at once."""
    with hold(cfg.output_dir, command, what="output_dir") if is_main_process() else nullcontext():
        console = console or _default_console()
        started = time.time()
        check = preflight(cfg, resume=resume, overwrite=overwrite, console=console)
        report_preflight(check, console)  # a data check at fail stops every rank here, before weights load or files are written
        return _run(check, overwrite=overwrite, started=started, command=command, console=console)


def _run(check: Preflight, *, overwrite: bool, started: float, command: str, console) -> TrainResult:
    # Imported once the pre-flight passed: TRL, PEFT and the model stack take ~7 s to import, and a refusal
    # should not wait for them (issue 27).
    from lora_ft.model.speed import liger_patches_scoped  # lazy: torch + transformers' modeling, ~4.6 s; after the pre-flight
    from lora_ft.training import preference  # lazy: ~6 s (torch, transformers, trl); not before train's 0.6 s refusals
    from lora_ft.training.finish import finalize, score_heldout  # lazy: ~6 s (torch, transformers, trl); not before train's 0.6 s refusals
    from lora_ft.training.fit import fit, load_model, open_run, record_start  # lazy: ~6 s (torch, transformers, trl); not before train's 0.6 s refusals
    from lora_ft.training.guards import StopSignals  # lazy: ~6 s (torch, transformers, trl); not before train's 0.6 s refusals
    from lora_ft.training.sft import build_trainer  # lazy: ~6 s (torch, transformers, trl); not before train's 0.6 s refusals

    start = open_run(check, overwrite=overwrite, started=started, command=command, console=console)
    _report_data(console, check.training_data)
    loaded = load_model(check, console)
    record_start(start, check, loaded)
    signals = StopSignals()
    with liger_patches_scoped(check.model_config, loaded.speed.liger):
        trainer = build_trainer(check.cfg, check, loaded.model, check.training_data, start.run, console, loaded.speed, signals, command)
        record = preference.run_record(check.cfg, trainer, list(loaded.chain)) if check.cfg.training.method != "sft" else None
        fit(trainer, start, signals)
        heldout = score_heldout(check, loaded, record)
        if not start.main:
            trainer.accelerator.wait_for_everyone()
            return TrainResult(start.run.path, None, heldout.scores, heldout.stop, check.deployment_notes, heldout.preference)
        if heldout.stop.get("warning"):
            console.print(f"[yellow]warning: {heldout.stop['warning']}[/]")
        manifest = finalize(start, check, loaded, trainer, heldout)
        trainer.accelerator.wait_for_everyone()
    _release_gpu_cache()
    return TrainResult(start.run.path, manifest, heldout.scores, heldout.stop, check.deployment_notes, heldout.preference)


def report_preflight(check: Preflight, console) -> None:
    """What train prints of the pre-flight (validate prints all of it): notes, warnings, then a failing data
    check stops the run (exit 2) with the one line validate ends with."""
    for finding in check.findings:
        if finding.source == "data check":
            if finding.level == "warn":
                console.print(f"[yellow]warning[/]: data check {escape(finding.text)}")
        elif finding.source == "deploy":
            console.print(f"deploy: {escape(finding.text)}")
        elif finding.source == "advice":
            console.print(f"[yellow]advice[/]: {escape(finding.text)}" if finding.level == "warn" else f"advice: {escape(finding.text)}")
        elif finding.level == "warn":
            console.print(f"[yellow]{escape(finding.text)}[/]")
        elif finding.source != "stop tokens":
            console.print(escape(finding.text))
    check.require_passed()


def _default_console():
    return Console(stderr=True, soft_wrap=True)  # a warning stays one line when piped


def _report_data(console, data) -> None:
    for split in (data.train, data.eval):
        if split is None:
            continue
        truncated = sum(1 for e in split.encoded if e.truncated)
        note = f", {truncated} truncated" if truncated else ""
        note += f", {len(split.dropped)} dropped (nothing to learn)" if split.dropped else ""
        console.print(
            f"[bold]{split.name}[/]: {len(split.encoded)} rows, {split.tokens:,} tokens "
            f"({split.trained_tokens:,} in the loss){note}"
        )


def _release_gpu_cache() -> None:
    import torch  # lazy: ~1.3 s; not before train's 0.6 s refusals

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
