"""The middle of a run: open the run folder, load the base with its LoRA, record the start, fit.

Each stage returns a frozen result the next ones read (`RunStart`, `LoadedModel`); the run folder's
run_state.json says at every moment whether the run is running, interrupted or failed, so a later
`loraft train` knows to resume it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from transformers import set_seed

from lora_ft.artifacts.checkpoints import data_hashes, report_resume, resume_hint, truncate_metrics
from lora_ft.artifacts.fingerprint import fingerprint_model_path
from lora_ft.artifacts.run_dir import CONFIG, METRICS, RunDir
from lora_ft.config import RunConfig
from lora_ft.config_io import config_to_yaml, redact
from lora_ft.errors import Interrupted
from lora_ft.metrics import heldout_loss
from lora_ft.model.coverage import check_same_coverage
from lora_ft.model.loading import attach_lora, load_base_model
from lora_ft.model.rank_stats import original_weight_norms
from lora_ft.model.speed import SpeedPlan, apply_speed_plan, plan_speed
from lora_ft.training.distributed import is_main_process
from lora_ft.training import preference
from lora_ft.training.guards import StopSignals
from lora_ft.training.preflight import Preflight

# PiSSA/OLoRA train against W minus the initial low-rank part; the adapter as it was before the first step
# is kept here until the end, when the trained one is converted to an ordinary adapter on the original W.
INITIAL_ADAPTER = "initial_adapter"


@dataclass(frozen=True)
class RunStart:
    run: RunDir
    main: bool  # rank 0: the one process that writes the run folder
    resume_from: Path | None  # the checkpoint this run continues from
    state: dict  # what run_state.json holds while it runs
    started: float
    command: str  # what the user typed, quoted back in interruption and resume messages


def open_run(check: Preflight, *, overwrite: bool, started: float, command: str, console) -> RunStart:
    """Rank 0 discards an old run (--overwrite; the pre-flight has passed) and says whether this run resumes."""
    cfg, main = check.cfg, is_main_process()
    run = RunDir.prepare(cfg.output_dir, overwrite=overwrite) if main else RunDir(Path(cfg.output_dir))
    plan = check.folder.resume
    if main:
        report_resume(console, run, plan)
    state = {"status": "running", "config_hash": config_hash(cfg), "started": started,
             "data": data_hashes(check.training_data.sources)}
    return RunStart(run, main, plan.checkpoint if plan is not None else None, state, started, command)


@dataclass(frozen=True)
class LoadedModel:
    model: object  # the base with LoRA attached and the speed plan applied
    speed: SpeedPlan  # planned again with the weights loaded
    base_fingerprint: str
    original: dict | None  # PiSSA/OLoRA: the original base's weight norms and held-out loss (see original_base)
    chain: tuple[dict, ...] = ()  # preference tuning after SFT: the earlier run whose adapter training starts from


def load_model(check: Preflight, console) -> LoadedModel:
    cfg = check.cfg
    with console.status(f"loading {cfg.model.name}"):
        base_fingerprint = fingerprint_model_path(check.source.path, check.source.gguf_file)
        set_seed(cfg.training.seed)
        model = load_base_model(cfg.model, check.source, check.precision)
        speed = plan_speed(cfg, check.model_config, trainable=check.trainable, precision=check.precision,
                           adapts_experts=check.coverage.experts)
        original = original_base(model, check.training_data, check.tokenizer, cfg) if cfg.lora.init in ("pissa", "olora") else None
        model = attach_lora(model, cfg.lora, check.token_training.peft_indices)
        check_same_coverage(model, check.coverage)
        # preference tuning after SFT: the earlier run's adapter is where training starts (and the reference)
        chain = (preference.load_start_adapter(model, cfg, base_fingerprint),) if cfg.model.adapter else ()
        apply_speed_plan(model, speed)
    console.print(check.coverage.summary().replace("reaches     ", "lora reaches ", 1))
    console.print(f"speed: {speed.summary()}")
    model.peft_config["default"].base_model_name_or_path = _recorded_base_name(cfg)
    return LoadedModel(model, speed, base_fingerprint, original, chain)


def record_start(start: RunStart, check: Preflight, loaded: LoadedModel) -> None:
    """Rank 0 writes the config and the running state (and a PiSSA/OLoRA run's initial adapter)."""
    if not start.main:
        return
    run, cfg = start.run, check.cfg
    run.create()
    run.write_text(CONFIG, config_to_yaml(cfg))
    run.write_state(start.state)
    if cfg.lora.init in ("pissa", "olora"):
        save_initial_adapter(loaded.model, run.path / INITIAL_ADAPTER)
    if start.resume_from is not None:
        truncate_metrics(run.path / METRICS, check.folder.resume.step)  # steps after the checkpoint are trained (and logged) again
    else:
        (run.path / METRICS).unlink(missing_ok=True)


def fit(trainer, start: RunStart, signals: StopSignals) -> None:
    """trainer.train, with the run's state kept true: interrupted (resumable) or failed."""
    run = start.run
    try:
        with signals:
            trainer.train(resume_from_checkpoint=str(start.resume_from) if start.resume_from else None)
    except KeyboardInterrupt:
        if start.main:
            run.write_state({**start.state, "status": "interrupted"})
        raise Interrupted(f"stopped at once without saving; {resume_hint(run, start.command)}") from None
    except BaseException as exc:
        if start.main:
            run.write_state({**start.state, "status": "failed", "error": redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)})
        raise
    if signals.received is not None and trainer.state.global_step < trainer.state.max_steps:
        if start.main:
            run.write_state({**start.state, "status": "interrupted", "signal": signals.name})
        raise Interrupted(f"{signals.name} at step {trainer.state.global_step}: {resume_hint(run, start.command)}",
                          exit_code=signals.exit_code)


def config_hash(cfg: RunConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def _recorded_base_name(cfg: RunConfig) -> str:
    local = Path(os.path.expanduser(cfg.model.name))
    return str(local.resolve()) if local.exists() else cfg.model.name


def original_base(model, data, tokenizer, cfg: RunConfig) -> dict:
    """What PiSSA/OLoRA take away once the adapter is attached (W becomes a residual, so disabling the
    adapter no longer gives the base): the weight norms and the held-out loss of the original base."""
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
