"""Train stage: config -> preflight checks -> data -> LoRA model -> TRL SFTTrainer -> a finished run folder.

`preflight` is everything `validate` and `train` check before a model's weights load (config,
device, tokenizer, target modules, data rows, the data checks). `to_sft_config` is the one place where our schema
meets TRL: every TRL/Trainer default we depend on is set explicitly there (TRL turns bf16 on by
default even on a CPU; we resolve precision once and record it).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from lora_ft import __version__
from lora_ft.config import RunConfig, config_to_yaml, redact
from lora_ft.training.distributed import effective_batch, is_main_process, world_size
from lora_ft.errors import ConfigError, Interrupted
from lora_ft.training.guards import NumericGuard, SignalCallback, StopSignals
from lora_ft.artifacts.manifests import RunManifest
from lora_ft.artifacts.run_dir import CONFIG, METRICS, RunDir, check_output_path
from lora_ft.data.pairs import load_preference_data, validate_preference_rows
from lora_ft.training import preference

# ---------------------------------------------------------------------------------------------
# Preflight: what `validate` prints and `train` checks before loading weights


@dataclass(frozen=True)
class Preflight:
    cfg: RunConfig
    source: "object"
    tokenizer: "object"
    model_config: "object"
    trainable: int
    total: int
    linear_layers: list[str]
    precision: str
    data: dict | None
    memory_gib: dict
    deployment_notes: tuple[str, ...] = ()  # conversions `loraft export` will make for serving.deployment
    coverage: "object" = None  # coverage.Coverage: what the targets reach, by block type
    data_check: "object" = None  # data_check.DataCheckResult: findings `train` prints, and a failing one stops it
    stop_tokens: "object" = None  # stop_tokens.StopTokenCheck
    token_training: "object" = None  # stop_tokens.TokenTraining
    advice: "object" = None  # training.advice.Advice: learning rate, rank, targets, batch, alpha, epochs vs what is known

    def summary(self) -> str:
        pct = 100.0 * self.trainable / max(self.total, 1)
        lines = [
            f"model       {self.cfg.model.name} ({self.model_config.model_type}, {self.total / 1e6:,.1f}M params)",
            f"lora        r={self.cfg.lora.rank} alpha={self.cfg.lora.resolved_alpha:g} scaling={self.cfg.lora.scaling:g} "
            f"targets={self.cfg.lora.target_modules if isinstance(self.cfg.lora.target_modules, str) else ','.join(self.cfg.lora.target_modules)}",
            f"trainable   {self.trainable:,} params ({pct:.3f}% of {self.total:,})",
            *([self.coverage.summary()] if self.coverage is not None else []),
            f"precision   {self.precision}" + (" + 4-bit base" if self.cfg.model.quantization else ""),
            f"memory      ~{self.memory_gib['total']:.1f} GiB estimated on the device "
            f"(weights {self.memory_gib['weights']:.1f}, LoRA+optimizer {self.memory_gib['lora_state']:.2f}, "
            f"activations {self.memory_gib['activations']:.1f}, logits {self.memory_gib['logits']:.1f})",
        ]
        if self.data:
            lines.append(
                f"data        {self.data['format']}: {self.data['train_rows']} train rows, {self.data['eval_rows']} eval rows"
            )
        else:
            lines.append("data        (no data section: train needs data.train)")
        if self.data_check is not None:
            lines.append(f"data check  {self.data_check.headline()}")
            lines += [f"  {f.level} {f.check} ({f.split}): {f.message}" for f in self.data_check.findings]
        lines.append(f"output      {self.cfg.output_dir}")
        lines += [f"deploy      note: {note}" for note in self.deployment_notes]
        if self.stop_tokens is not None:
            from lora_ft.model.stop_tokens import check_lines

            lines += check_lines(self.stop_tokens, self.token_training)
        if self.advice is not None:
            lines.append(self.advice.summary())
        return "\n".join(lines)


def preflight(cfg: RunConfig, *, need_data: bool = True, console=None) -> Preflight:
    from lora_ft.data.rows import validate_rows
    from lora_ft.data_check import check_data
    from lora_ft.serving.engines import check_deployment
    from lora_ft.model.loading import (
        check_device_support,
        check_weight_format,
        count_lora_params,
        load_model_config,
        load_tokenizer,
        resolve_model_source,
        resolve_precision,
    )
    from lora_ft.model.speed import check_speed_choices
    from lora_ft.model.stop_tokens import check_stop_tokens, plan_token_training
    from lora_ft.training.advice import advise, data_size_from, shapes_from

    precision = resolve_precision(cfg.training.precision)
    check_device_support(cfg.model, precision)
    check_speed_choices(cfg)
    if need_data and cfg.data is None:
        raise ConfigError("data: missing; add data.train: path/to/train.jsonl")
    if cfg.data is not None:  # cheap file checks before the (possibly large) Hub download
        for source in (cfg.data.train, cfg.data.eval):
            if source is not None and source.is_local and not Path(source.path).expanduser().exists():
                raise ConfigError(f"data file not found: {source.path}")
    source = resolve_model_source(cfg.model)
    check_weight_format(cfg.model, source)
    tokenizer = load_tokenizer(cfg.model, source)
    model_config = load_model_config(cfg.model, source)
    # Stop/turn tokens whose rows the base never trained, read from the weight files before they load.
    stop_tokens = check_stop_tokens(tokenizer, source, model_config, trust_remote_code=cfg.model.trust_remote_code)
    token_training = plan_token_training(cfg.lora, stop_tokens, tokenizer)
    counts, linear, reach = count_lora_params(model_config, cfg.lora, cfg.model.trust_remote_code, token_training.peft_indices)
    # The serving targets see the rows that will actually train (auto decides that only here).
    planned = cfg.lora.model_copy(update={"train_tokens": list(token_training.tokens.values()) or "off"})
    notes = check_deployment(cfg.serving, planned, model_config.model_type, source.gguf_file is not None)
    data = data_check = None
    if cfg.data is not None:
        if cfg.training.method == "sft":
            data = validate_rows(cfg.data, bool(getattr(tokenizer, "chat_template", None)), cfg.training.seed)
        else:
            data = validate_preference_rows(cfg.data, tokenizer, cfg.training.seed, cfg.training.method)
        data_check = check_data(cfg, tokenizer, console=console)
    memory = estimate_memory_gib(cfg, model_config, counts.total, counts.trainable, precision)
    advice = advise(cfg, shapes_from(model_config, reach), data_size_from(data_check, data))
    return Preflight(cfg, source, tokenizer, model_config, counts.trainable, counts.total, linear, precision, data, memory,
                     tuple(notes), reach, data_check, stop_tokens=stop_tokens, token_training=token_training, advice=advice)


def estimate_memory_gib(cfg: RunConfig, model_config, total: int, trainable: int, precision: str) -> dict:
    """A planning figure, not a promise: frozen weights + LoRA state + activations + logits."""
    gib = 2**30
    q = cfg.model.quantization
    weight_bytes = (0.55 if q.bits == 4 else 1.05) if q else {"bf16": 2, "fp16": 2, "fp32": 4}[precision]
    if cfg.model.dtype != "auto" and not q:
        weight_bytes = {"bfloat16": 2, "float16": 2, "float32": 4}[cfg.model.dtype]
    act_bytes = 4 if precision == "fp32" else 2
    t = cfg.training
    tokens = t.batch_size * t.max_seq_length
    hidden = getattr(model_config, "hidden_size", 0) or 0
    inter = getattr(model_config, "intermediate_size", 4 * hidden) or 4 * hidden
    layers = getattr(model_config, "num_hidden_layers", 0) or 0
    vocab = getattr(model_config, "vocab_size", 0) or 0
    per_layer_full = tokens * (16 * hidden + 4 * inter) * act_bytes  # attention + MLP intermediates, one layer
    if t.gradient_checkpointing:
        activations = layers * tokens * hidden * act_bytes + per_layer_full
    else:
        activations = layers * per_layer_full
    logits = tokens * vocab * (act_bytes + 4 + 4)  # logits, fp32 upcast, its gradient
    parts = {
        "weights": total * weight_bytes / gib,
        "lora_state": trainable * 16 / gib,  # fp32 weight + grad + two Adam moments
        "activations": activations / gib,
        "logits": logits / gib,
    }
    parts["total"] = sum(parts.values())
    return parts


# ---------------------------------------------------------------------------------------------
# The stage


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    manifest: RunManifest | None  # None on ranks other than 0: only rank 0 writes the run folder
    scores: dict = field(default_factory=dict)
    stop: dict = field(default_factory=dict)  # stop-token probability at the end of held-out answers, base and adapter
    preference: dict | None = None  # preference runs: method, reference, chain, held-out preference accuracy

    def summary(self) -> str:
        from lora_ft.data_check import heldout_caveat

        lines = [f"adapter written to {self.run_dir}"]
        m = self.manifest
        if m is not None and m.metrics.train_loss is not None:
            lines.append(f"train loss      {m.metrics.train_loss:.4f} after {m.metrics.steps} steps in {m.wall_seconds:.0f}s")
            lines.append(f"speed           {speed_line(self.run_dir, m.metrics.peak_gpu_memory_gib)}")
        base, tuned = self.scores.get("base"), self.scores.get("adapter")
        if self.preference is not None:
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
        if self.stop.get("adapter"):
            b, a = self.stop["base"], self.stop["adapter"]
            lines.append(
                f"stops           p(stop) at the end of held-out answers: base {b['mean_probability']:.3f} -> adapter "
                f"{a['mean_probability']:.3f}; most likely next token in {b['top1_share']:.0%} -> {a['top1_share']:.0%} "
                f"of {a['answers']} answers"
            )
        if self.stop.get("warning"):
            lines.append(f"warning         {self.stop['warning']}")
        if m is not None and m.advice is not None:
            lines += [f"advice          {line}" for f in m.advice.after for line in f.lines()]
        return "\n".join(lines)

    def to_json(self) -> dict:
        manifest = self.manifest.model_dump(mode="json") if self.manifest is not None else None
        return {"run_dir": str(self.run_dir), "scores": self.scores, "stop": self.stop, "preference": self.preference,
                "manifest": manifest}


def speed_line(run_dir: Path, peak_gib: float | None) -> str:
    """Mean training tokens/s (metrics.jsonl's last record) next to the peak GPU memory."""
    from lora_ft.training.progress import read_metrics

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
    from contextlib import nullcontext

    from lora_ft.artifacts.locks import hold

    with hold(cfg.output_dir, command, what="output_dir") if is_main_process() else nullcontext():
        return _train(cfg, resume=resume, overwrite=overwrite, console=console, command=command)


def _train(cfg: RunConfig, *, resume: bool, overwrite: bool, console, command: str) -> TrainResult:
    from transformers import set_seed

    from lora_ft.data.chat_template import check_end_of_turn, require_end_of_turn
    from lora_ft.artifacts.checkpoints import check_same_data, data_hashes, plan_resume, report_resume, truncate_metrics
    from lora_ft.data.rows import load_training_data
    from lora_ft.data_check import enforce_data_check
    from lora_ft.artifacts.fingerprint import fingerprint_model_path
    from lora_ft.model.coverage import check_same_coverage
    from lora_ft.model.loading import attach_lora, load_base_model
    from lora_ft.model.speed import apply_speed_plan, liger_patches_scoped, plan_speed

    console = console or _default_console()
    started = time.time()
    check = preflight(cfg, console=console)
    for note in check.deployment_notes:
        console.print(f"deploy: {note}")
    for finding in check.advice.findings if check.advice is not None else ():
        if finding.level != "ok":  # advice never blocks a run
            console.print(f"[yellow]advice[/]: {finding.line()}" if finding.level == "warn" else f"advice: {finding.line()}")
    gate = enforce_data_check(check.data_check, console)  # a data check at fail stops every rank here, before weights load or files are written
    main = is_main_process()
    check_output_path(Path(cfg.output_dir), _input_paths(cfg, check.source))  # before --overwrite deletes anything
    # Only rank 0 prepares and writes the run folder; other ranks only read which checkpoint to resume.
    run = RunDir.prepare(cfg.output_dir, overwrite=overwrite) if main else RunDir(Path(cfg.output_dir))
    plan = plan_resume(run, cfg, explicit=resume) if main or not overwrite else None
    if main:
        report_resume(console, run, plan)

    with console.status("tokenizing data"):
        if cfg.training.method == "sft":
            data = load_training_data(cfg.data, check.tokenizer, max_seq_length=cfg.training.max_seq_length, seed=cfg.training.seed,
                                      model_eos=check.model_config.eos_token_id)
        else:
            data = load_preference_data(cfg.data, check.tokenizer, max_seq_length=cfg.training.max_seq_length,
                                        max_prompt_length=cfg.preference.max_prompt_length, seed=cfg.training.seed,
                                        model_eos=check.model_config.eos_token_id)
    data.heldout_overlap = gate.overlap.to_json() if gate.overlap else None
    _report_data(console, data)
    if plan is not None and plan.checkpoint is not None:
        check_same_data(run, data.sources)
    end_of_turn = check_end_of_turn(data.train.encoded, check.tokenizer, cfg.data.train_on) if cfg.training.method == "sft" else None
    require_end_of_turn(end_of_turn) if end_of_turn is not None else None
    if end_of_turn is not None and end_of_turn.turns:
        console.print(f"end of turn: {end_of_turn.token} trained in {end_of_turn.turns} assistant turns")
    if check.stop_tokens.flagged:
        from lora_ft.model.stop_tokens import check_lines

        for line in check_lines(check.stop_tokens, check.token_training):
            console.print(f"[yellow]{line}[/]")

    with console.status(f"loading {cfg.model.name}"):
        base_fingerprint = fingerprint_model_path(check.source.path, check.source.gguf_file)
        set_seed(cfg.training.seed)
        model = load_base_model(cfg.model, check.source, check.precision)
        speed = plan_speed(cfg, check.model_config, trainable=check.trainable)
        original = original_base(model, data, check.tokenizer, cfg) if cfg.lora.init in ("pissa", "olora") else None
        model = attach_lora(model, cfg.lora, check.token_training.peft_indices)
        check_same_coverage(model, check.coverage)
        # preference tuning after SFT: the earlier run's adapter is where training starts (and the reference)
        chain = [preference.load_start_adapter(model, cfg, base_fingerprint)] if cfg.model.adapter else []
        apply_speed_plan(model, speed)
    console.print(check.coverage.summary().replace("reaches     ", "lora reaches ", 1))
    console.print(f"speed: {speed.summary()}")
    model.peft_config["default"].base_model_name_or_path = _recorded_base_name(cfg, check.source)

    state = {"status": "running", "config_hash": config_hash(cfg), "started": started, "data": data_hashes(data.sources)}
    resume_from = plan.checkpoint if plan is not None else None
    if main:
        run.create()
        run.write_text(CONFIG, config_to_yaml(cfg))
        run.write_state(state)
        if cfg.lora.init in ("pissa", "olora"):
            save_initial_adapter(model, run.path / INITIAL_ADAPTER)
        if resume_from is not None:
            truncate_metrics(run.path / METRICS, plan.step)  # steps after the checkpoint are trained (and logged) again
        else:
            (run.path / METRICS).unlink(missing_ok=True)

    signals = StopSignals()
    with liger_patches_scoped(check.model_config, speed.liger):
        trainer = _build_trainer(cfg, check, model, data, run, console, speed, signals, command)
        record = preference.run_record(cfg, trainer, chain) if cfg.training.method != "sft" else None
        return _run_and_finish(cfg, check, model, data, run, console, speed, signals, command, trainer, state,
                               resume_from, base_fingerprint, started, main, original, record)


def _run_and_finish(cfg, check, model, data, run, console, speed, signals, command, trainer, state, resume_from,
                    base_fingerprint, started, main, original=None, record=None) -> TrainResult:
    import torch

    from lora_ft.artifacts.checkpoints import resume_hint

    try:
        with signals:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except KeyboardInterrupt:
        if main:
            run.write_state({**state, "status": "interrupted"})
        raise Interrupted(f"stopped at once without saving; {resume_hint(run, command)}") from None
    except BaseException as exc:
        if main:
            run.write_state({**state, "status": "failed", "error": redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)})
        raise
    if signals.received is not None and trainer.state.global_step < trainer.state.max_steps:
        if main:
            run.write_state({**state, "status": "interrupted", "signal": signals.name})
        raise Interrupted(f"{signals.name} at step {trainer.state.global_step}: {resume_hint(run, command)}", exit_code=signals.exit_code)

    model.eval()
    if record is not None:  # preference: held-out pairs instead of held-out loss and stop tokens
        scores, stop = {}, {}
        record["heldout"] = preference.preference_scores(model, data, batch_size=cfg.training.batch_size)
        preference.drop_reference(model)  # the SFT reference copy is not part of what the run folder holds
    else:
        scores = final_scores(model, data, check.tokenizer, cfg.training.batch_size)
        if scores and original:  # PiSSA/OLoRA: with the adapter disabled the model is the residual, not the base
            scores["base"] = original["heldout"]
        stop = stop_after_training(model, data, check, cfg.training.batch_size)
    if not main:
        trainer.accelerator.wait_for_everyone()
        return TrainResult(run.path, None, scores, stop, record)
    if stop.get("warning"):
        console.print(f"[yellow]warning: {stop['warning']}[/]")
    manifest = finalize(
        run,
        trainer,
        cfg,
        check,
        data,
        scores=scores,
        stop=stop,
        speed=speed,
        base_fingerprint=base_fingerprint,
        wall_seconds=time.time() - started,
        original=original,
        preference=record,
    )
    trainer.accelerator.wait_for_everyone()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return TrainResult(run.path, manifest, scores, stop, record)


def _input_paths(cfg: RunConfig, source) -> list[Path]:
    """Everything the run reads from local disk; output_dir may not be or contain any of it."""
    paths = [Path(source.path) / source.gguf_file if source.gguf_file else Path(source.path)]
    for data_source in (cfg.data.train, cfg.data.eval) if cfg.data else ():
        if data_source is not None and data_source.is_local:
            paths.append(Path(data_source.path).expanduser())
    if cfg.model.chat_template and Path(cfg.model.chat_template).expanduser().exists():
        paths.append(Path(cfg.model.chat_template).expanduser())
    return paths


def _default_console():
    from rich.console import Console

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


def _recorded_base_name(cfg: RunConfig, source) -> str:
    local = Path(os.path.expanduser(cfg.model.name))
    return str(local.resolve()) if local.exists() else cfg.model.name


def config_hash(cfg: RunConfig) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def to_sft_config(cfg: RunConfig, run: RunDir, precision: str, speed, *, has_eval: bool, pad_token: str):
    """TRL's SFTConfig from our schema; every default we rely on is stated here."""
    from trl import SFTConfig

    return SFTConfig(
        **trainer_arguments(cfg, run, precision, speed, has_eval=has_eval),
        # Rows arrive tokenized, labelled and truncated by data/rows.py; TRL only packs when asked. Padding-free
        # without packing: TRL refuses a max_length it would not enforce; the rows are already cut to it.
        max_length=None if speed.batching == "padding-free" else cfg.training.max_seq_length,
        packing=cfg.data.packing,
        padding_free=speed.batching == "padding-free",
        dataset_kwargs={"skip_prepare_dataset": not cfg.data.packing},
        pad_token=pad_token,
    )


def trainer_arguments(cfg: RunConfig, run: RunDir, precision: str, speed, *, has_eval: bool) -> dict:
    """The Trainer arguments every method shares (SFT here, DPO/KTO in training/preference.py)."""
    import torch

    t = cfg.training
    eval_strategy = "no"
    if has_eval:
        eval_strategy = "steps" if t.eval_steps else "epoch"
    save_strategy = "steps" if t.save_steps or t.early_stopping_patience else "epoch"
    save_steps = t.save_steps or t.eval_steps or 500
    return dict(
        output_dir=str(run.checkpoints),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        # transformers 5 reads a float below 1 as a ratio of the total steps.
        warmup_steps=t.warmup_steps if t.warmup_steps is not None else t.warmup_ratio,
        weight_decay=t.weight_decay,
        optim=speed.optimizer,
        max_grad_norm=t.max_grad_norm,
        # Checkpointing is set per layer by speed.apply_speed_plan before the Trainer sees the model.
        gradient_checkpointing=False,
        use_liger_kernel=speed.liger,
        activation_offloading=t.activation_offloading and torch.cuda.is_available(),
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # applied on the device by speed.SyncFreeSteps (the Trainer's costs a sync a step)
        eval_strategy=eval_strategy,
        eval_steps=t.eval_steps,
        save_strategy=save_strategy,
        save_steps=save_steps,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=t.early_stopping_patience is not None,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        report_to=list(t.report_to) or "none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        push_to_hub=False,
        hub_token=None,
    )


def _build_trainer(cfg: RunConfig, check: Preflight, model, data, run: RunDir, console, speed, signals, command: str):
    from transformers import EarlyStoppingCallback, PrinterCallback

    from lora_ft.artifacts.checkpoints import CheckpointWriter
    from lora_ft.training.progress import MetricsCallback

    has_eval = data.eval is not None
    if cfg.training.method == "sft":
        args = to_sft_config(cfg, run, check.precision, speed, has_eval=has_eval, pad_token=check.tokenizer.pad_token)
    else:
        args = preference.to_preference_config(cfg, trainer_arguments(cfg, run, check.precision, speed, has_eval=has_eval))
    callbacks = [MetricsCallback(run.path / METRICS, console), SignalCallback(signals)]
    if cfg.training.method != "sft":
        callbacks.append(preference.FallingLogpsCallback(console, run.path / METRICS if is_main_process() else None))
    if cfg.training.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.training.early_stopping_patience))
    hint = (
        f"The last good checkpoint is kept: to step over such batches set training.nan_policy: skip and rerun "
        f"`{command}`; to change learning rate or alpha, start over with `{command} --overwrite`"
    )
    base = preference.trainer_base(cfg.training.method) if cfg.training.method != "sft" else None
    trainer = _trainer_class(base)(
        writer=CheckpointWriter(run.checkpoints, keep=cfg.training.save_total_limit, trainable_params=check.trainable),
        guard=NumericGuard(
            cfg.training.nan_policy, cfg.training.max_skipped_steps, run.path / METRICS if is_main_process() else None, console, hint
        ),
        model=model,
        args=args,
        train_dataset=data.train.to_dataset(),
        eval_dataset=data.eval.to_dataset() if data.eval else None,
        processing_class=check.tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # our MetricsCallback prints instead of raw log dicts
    return trainer


def _trainer_class(base=None):
    """SFTTrainer (or `base`: a preference trainer) with atomic, validated checkpoints and a finiteness check on
    every optimizer step."""
    from trl import SFTTrainer

    from lora_ft.artifacts.checkpoints import is_disk_full
    from lora_ft.model.speed import SyncFreeSteps

    class LoraftTrainer(SyncFreeSteps, base or SFTTrainer):  # the guard runs after every backward (SyncFreeSteps)
        def __init__(self, *args, writer, guard, **kwargs):
            super().__init__(*args, **kwargs)
            self.writer, self.guard, self._staging = writer, guard, None

        def _get_output_dir(self, trial):
            # While saving, the Trainer writes checkpoint-N under the staging folder instead.
            return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial):
            step = self.state.global_step
            # Rank 0 alone prepares and commits the staging folder; every rank writes its RNG state into it.
            if self.args.should_save:
                self.writer.begin(step, self.model)
            self.accelerator.wait_for_everyone()
            self._staging = self.writer.staging_parent
            try:
                super()._save_checkpoint(model, trial)
            except (OSError, RuntimeError) as exc:
                if is_disk_full(exc) or self.writer.free_space_short():
                    raise self.writer.disk_full(step) from None
                raise
            finally:
                self._staging = None
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                self.writer.commit(step, self.state)

    return LoraftTrainer


def final_scores(model, data, tokenizer, batch_size: int) -> dict:
    """Held-out loss of the base (adapter disabled) and of the adapter, on the same tokens."""
    from lora_ft.evaluate import heldout_loss

    if data.eval is None:
        return {}
    pad = tokenizer.pad_token_id
    return {
        "base": heldout_loss(model, data.eval.encoded, pad_token_id=pad, batch_size=batch_size, disable_adapter=True),
        "adapter": heldout_loss(model, data.eval.encoded, pad_token_id=pad, batch_size=batch_size),
    }


def stop_after_training(model, data, check: Preflight, batch_size: int) -> dict:
    """How likely base and adapter are to stop where held-out answers end; a warning with cause and fix
    when the adapter would not stop on most of them."""
    from lora_ft.model.stop_tokens import stop_score, stop_warning

    if data.eval is None:
        return {}
    ids, pad = list(data.conversation.stop_ids), check.tokenizer.pad_token_id  # the ids eval, generate and serve stop on
    base = stop_score(model, data.eval.encoded, ids, pad_token_id=pad, batch_size=batch_size, disable_adapter=True)
    adapter = stop_score(model, data.eval.encoded, ids, pad_token_id=pad, batch_size=batch_size)
    if adapter is None:
        return {}
    return {"stop_ids": ids, "base": base.to_json(), "adapter": adapter.to_json(),
            "warning": stop_warning(adapter, check.stop_tokens, check.token_training)}


# ---------------------------------------------------------------------------------------------
# Finishing: adapter, tokenizer, card, curve, and the manifest last


def finalize(
    run: RunDir, trainer, cfg: RunConfig, check: Preflight, data, *, scores, speed, base_fingerprint, wall_seconds,
    original=None, stop: dict | None = None, preference: dict | None = None,
) -> RunManifest:
    from lora_ft.data.chat_template import generation_config
    from lora_ft.model.coverage import parameter_wrappers
    from lora_ft.artifacts.manifests import (
        BaseModelRecord, ChatRecord, DataRecord, DistributedRecord, LoraRecord, MetricsRecord, write_manifest,
    )
    from lora_ft.training.progress import peak_gpu_gib, plot_loss_curve, read_metrics
    from lora_ft.rank_diagnostics import adapter_statistics, model_weight_norms

    stage = run.staging()
    model = trainer.model
    conversion = save_adapter(model, stage, cfg.lora, run.path / INITIAL_ADAPTER)
    wrappers = parameter_wrappers(model)
    check.tokenizer.save_pretrained(str(stage))
    generation = generation_config(check.model_config, data.conversation)
    generation.save_pretrained(str(stage))
    data.conversation.save(stage)  # how eval, generate, chat and serve prompt this run
    history = read_metrics(run.path / METRICS)
    plot_loss_curve(history, stage / "loss_curve.png")
    state = trainer.state
    train_losses = [h["loss"] for h in history if "loss" in h]
    # what `loraft inspect` reports per module (spectrum, effective rank, ||dW||/||W||), kept with the run
    stats = adapter_statistics(stage, None, (original or {}).get("norms") or model_weight_norms(model), wrappers=wrappers)
    manifest = RunManifest(
        loraft_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        wall_seconds=round(wall_seconds, 1),
        config_hash=config_hash(cfg),
        base_model=BaseModelRecord(
            name=cfg.model.name,
            revision=cfg.model.revision,
            resolved_path=check.source.display,
            fingerprint=base_fingerprint,
            model_type=check.model_config.model_type,
            quantization=cfg.model.quantization,
        ),
        lora=LoraRecord(
            rank=cfg.lora.rank,
            alpha=cfg.lora.resolved_alpha,
            scaling=cfg.lora.scaling,
            target_modules=sorted(model.peft_config["default"].target_modules),
            target_parameters=sorted(model.peft_config["default"].target_parameters or []),
            coverage=check.coverage.to_json() if check.coverage is not None else None,
            use_rslora=cfg.lora.use_rslora,
            use_dora=cfg.lora.use_dora,
            init=cfg.lora.init,
            converted=conversion,
            parameter_wrappers={k: {**w.__dict__, "shape": list(w.shape)} for k, w in wrappers.items()},
        ),
        chat=ChatRecord(
            template=cfg.model.chat_template or ("tokenizer" if check.tokenizer.chat_template else None),
            end_of_turn=data.conversation.end_of_turn,
            stop_token_ids=generation.eos_token_id,
            train_on=cfg.data.train_on,
        ),
        # stop/turn tokens whose rows looked untrained, which rows trained, and how often the adapter stops
        stop_tokens={
            "check": check.stop_tokens.to_json(),
            "train_tokens": check.token_training.to_json(),
            "after_training": stop or None,
        },
        trainable_params=check.trainable,
        total_params=check.total,
        precision=check.precision,
        speed=speed.to_json(),
        distributed=DistributedRecord(
            world_size=world_size(),
            strategy=cfg.distributed.strategy if world_size() > 1 else None,
            effective_batch_size=effective_batch(cfg),
        ),
        seed=cfg.training.seed,
        data=DataRecord(
            format=data.format,
            sources=data.sources,
            dropped_rows=len(data.train.dropped) + (len(data.eval.dropped) if data.eval else 0),
            heldout_overlap=data.heldout_overlap,
        ),
        metrics=MetricsRecord(
            steps=state.global_step,
            epochs=round(state.epoch or 0, 3),
            train_loss=train_losses[-1] if train_losses else None,
            tokens_seen=int(getattr(state, "num_input_tokens_seen", 0) or 0),
            peak_gpu_memory_gib=peak_gpu_gib(),
            heldout=scores,
        ),
        environment=environment(),
        serving=cfg.serving,
        preference=preference,
        adapter_stats=stats,
        advice=advice_record(cfg, check.advice, stats, history),
    )
    (stage / "README.md").write_text(model_card(cfg, manifest), encoding="utf-8")
    run.install(stage)
    stage.rmdir()
    shutil.rmtree(run.path / INITIAL_ADAPTER, ignore_errors=True)
    write_manifest(run.path, manifest)  # "finished" from here on; then the unfinished marker goes
    (run.path / "run_state.json").unlink(missing_ok=True)
    return manifest


def advice_record(cfg: RunConfig, advice, stats: dict, history: list[dict]):
    """The pre-flight advice and what the run did against it (rank verdict, update size, losses), for the manifest."""
    from lora_ft.artifacts.manifests import AdviceRecord
    from lora_ft.rank_diagnostics import gradient_report, run_outcome
    from lora_ft.training.advice import after_run

    before = advice.findings if advice is not None else ()
    relative = stats["mean_relative_norm"]
    outcome = run_outcome(cfg.lora.rank, stats["verdict"], stats["median_rank_used"], relative,
                          gradient_report(history, relative), history)
    return AdviceRecord(before=list(before), after=list(after_run(outcome, before, cfg.advice.off)), off=list(cfg.advice.off))


# PiSSA/OLoRA train against W minus the initial low-rank part; the adapter as it was before the first step
# is kept here until the end, when the trained one is converted to an ordinary adapter on the original W.
INITIAL_ADAPTER = "initial_adapter"


def original_base(model, data, tokenizer, cfg: RunConfig) -> dict:
    """What PiSSA/OLoRA take away once the adapter is attached (W becomes a residual, so disabling the
    adapter no longer gives the base): the weight norms and the held-out loss of the original base."""
    from lora_ft.evaluate import heldout_loss
    from lora_ft.rank_diagnostics import original_weight_norms

    heldout = None
    if data.eval is not None:
        heldout = heldout_loss(model, data.eval.encoded, pad_token_id=tokenizer.pad_token_id, batch_size=cfg.training.batch_size)
    return {"norms": original_weight_norms(model), "heldout": heldout}


def save_initial_adapter(model, path: Path) -> None:
    """The PiSSA/OLoRA adapter before training (loaded back as plain weights, hence init_lora_weights True).
    A resumed run keeps the one written at its start: the same decomposition of the same base."""
    if (path / "adapter_model.safetensors").is_file():
        return
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True
    try:
        model.save_pretrained(str(path), safe_serialization=True)
    finally:
        config.init_lora_weights = init


def save_adapter(model, stage: Path, lora, initial: Path) -> dict | None:
    """Save the adapter; a PiSSA/OLoRA one converted (PEFT's path_initial_model_for_weight_conversion) to an
    ordinary rank-2r adapter on the original base, so merge, eval, generate and plain PEFT need no residual
    base. Returns what the manifest records about the conversion (None for other inits)."""
    if lora.init not in ("pissa", "olora"):
        model.save_pretrained(str(stage), safe_serialization=True)
        return None
    model.save_pretrained(str(stage), safe_serialization=True, path_initial_model_for_weight_conversion=str(initial))
    saved = json.loads((stage / "adapter_config.json").read_text(encoding="utf-8"))
    return {
        "from": lora.init,
        "trained_rank": lora.rank,
        "saved_rank": saved["r"],
        "saved_alpha": saved["lora_alpha"],
        "base": "original",
        "why": f"{lora.init} trains against W minus its initial low-rank part; the saved adapter is the trained "
               "update minus the initial one (rank 2r, same alpha/r), applied to the original W",
    }


def environment() -> dict:
    import importlib.metadata as md

    import torch

    versions = {}
    for name in ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    return {"python": platform.python_version(), "platform": platform.platform(), "device": device, **versions}


def _converted_note(manifest: RunManifest) -> str:
    converted = manifest.lora.converted
    if not converted:
        return ""
    return f" ({converted['from']}; saved converted to rank {converted['saved_rank']} on the original base)"


def model_card(cfg: RunConfig, manifest: RunManifest) -> str:
    held = manifest.metrics.heldout
    score = ""
    if held:
        score = (
            f"| held-out loss | {held['base'].loss:.4f} | {held['adapter'].loss:.4f} |\n"
            f"| held-out perplexity | {held['base'].perplexity:.2f} | {held['adapter'].perplexity:.2f} |\n"
        )
    return f"""---
library_name: peft
base_model: {cfg.model.name}
tags: [lora, loraft]
---
# LoRA adapter for {cfg.model.name}

Trained with loraft {__version__}: rank {cfg.lora.rank}, alpha {cfg.lora.resolved_alpha:g}{_converted_note(manifest)},
targets {', '.join(manifest.lora.target_modules)}; {manifest.trainable_params:,} trainable parameters;
{manifest.metrics.steps} steps, precision {manifest.precision}, seed {cfg.training.seed}.

| metric | base | adapter |
|---|---|---|
{score}
Base weights fingerprint: `{manifest.base_model.fingerprint}` (merge and eval check it).

```python
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained({base_load_args(manifest.base_model)})
model = PeftModel.from_pretrained(base, {str(Path(cfg.output_dir).resolve())!r})  # this folder
```
Or: `loraft merge --adapter {cfg.output_dir} --out merged/`.
"""


def base_load_args(base) -> str:
    """from_pretrained's arguments for the base as recorded, runnable as written: a GGUF base (pkg:// too) as
    its real folder and file, a local folder as its absolute path, a Hub id as the id (and revision)."""
    path = Path(base.resolved_path)
    if path.suffix == ".gguf":
        return f"{str(path.parent)!r}, gguf_file={path.name!r}"
    if base.name.startswith((".", "/", "~")) or Path(os.path.expanduser(base.name)).exists():
        return repr(str(path))
    return repr(base.name) + (f", revision={base.revision!r}" if base.revision else "")

