"""The pre-flight: everything `train` checks before a model's weights load, run once; `validate` prints it.

In order, cheapest first: the output folder and resume compatibility (training/run_folder.py: no torch, so
a re-run of a finished run is refused in about a second), the data files exist, then device, model source,
tokenizer, LoRA targets, stop tokens, serving rules, the data read and prepared once (data/prepared.py) with
its checks and the end-of-turn rule, a resumed run's data unchanged, and one memory estimate (model/memory.py,
the checkpointing planner's own model). What it finds beyond hard errors is a list of typed `Finding`s: other
stages add theirs (advice) to the same list, and `validate` and `train` print the same lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_ft.artifacts.checkpoints import check_same_data
from lora_ft.artifacts.run_dir import check_output_path
from lora_ft.config import RunConfig
from lora_ft.data.pairs import load_preference_data, validate_preference_rows
from lora_ft.data.prepared import prepare_data
from lora_ft.data_check import check_data
from lora_ft.errors import ConfigError, DataError
from lora_ft.model.memory import PLANNING_MARGIN_GIB, estimate_memory, logits_gib, weights_gib
from lora_ft.training.distributed import is_main_process
from lora_ft.training.run_folder import FolderCheck, check_run_folder, input_paths


@dataclass(frozen=True)
class Finding:
    source: str  # what found it: data check, deploy, stop tokens, end of turn, advice
    level: str  # note | info | warn | fail
    text: str

    def line(self) -> str:
        if self.source == "data check":
            return f"  {self.level} {self.text}"
        if self.source == "deploy":
            return f"deploy      note: {self.text}"
        return self.text


@dataclass(frozen=True)
class Preflight:
    cfg: RunConfig
    folder: FolderCheck | None  # None when the config names no output_dir (a library caller's validate)
    source: object  # loading.ModelSource
    tokenizer: object
    model_config: object
    trainable: int
    total: int
    linear_layers: list[str]
    precision: str
    coverage: object  # coverage.Coverage: what the targets reach, by block type
    stop_tokens: object  # stop_tokens.StopTokenCheck
    token_training: object  # stop_tokens.TokenTraining
    speed: object  # speed.SpeedPlan as planned before the weights load (train plans again with the real weights)
    memory: object  # memory.MemoryEstimate
    data: object = None  # prepared.PreparedData of SFT rows (None: no data section, or preference pairs)
    data_counts: dict | None = None  # format, train_rows, eval_rows
    training_data: object = None  # rows.TrainingData: what the Trainer consumes, cut to max_seq_length
    data_check: object = None  # data_check.DataCheckResult
    findings: tuple[Finding, ...] = ()
    advice: object = None  # training.advice.Advice: learning rate, rank, targets, batch, alpha, epochs vs what is known

    @property
    def deployment_notes(self) -> tuple[str, ...]:
        return tuple(f.text for f in self.findings if f.source == "deploy")

    @property
    def failed(self) -> bool:
        return self.data_check is not None and self.data_check.failed

    def require_passed(self, config: str = "CONFIG") -> None:
        """A data check set to fail fired: one line (exit 2), after the findings were shown."""
        if self.failed:
            raise DataError(self.data_check.failure_line(config))

    def summary(self) -> str:
        lora = self.cfg.lora
        targets = lora.target_modules if isinstance(lora.target_modules, str) else ",".join(lora.target_modules)
        lines = [
            f"model       {self.cfg.model.name} ({self.model_config.model_type}, {self.total / 1e6:,.1f}M params)",
            f"lora        r={lora.rank} alpha={lora.resolved_alpha:g} scaling={lora.scaling:g} targets={targets}",
            f"trainable   {self.trainable:,} params ({100.0 * self.trainable / max(self.total, 1):.3f}% of {self.total:,})",
            *([self.coverage.summary()] if self.coverage is not None else []),
            f"precision   {self.precision}" + (" + 4-bit base" if self.cfg.model.quantization else ""),
            self.memory.summary(),
            f"speed       {self.speed.summary()}",
        ]
        if self.data_counts is not None:
            counts = self.data_counts
            lines.append(f"data        {counts['format']}: {counts['train_rows']} train rows, {counts['eval_rows']} eval rows")
        else:
            lines.append("data        (no data section: train needs data.train)")
        if self.data_check is not None:
            lines.append(f"data check  {self.data_check.headline()}")
        lines += [f.line() for f in self.findings if f.source == "data check"]
        lines.append(self.folder.line() if self.folder is not None else f"output      {self.cfg.output_dir}")
        lines += [f.line() for f in self.findings if f.source not in ("data check", "advice")]
        if self.advice is not None:
            lines.append(self.advice.summary())
        return "\n".join(lines)


def preflight(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, need_data: bool = True, console=None) -> Preflight:
    """Every check train runs before loading weights, in one pass; raises the first hard error (exit 2).
    `need_data=False` (validate of a config without a data section) skips what needs rows."""
    folder = None
    if cfg.output_dir is not None:
        folder = check_run_folder(cfg, resume=resume, overwrite=overwrite, main=is_main_process())
    if need_data and cfg.data is None:
        raise ConfigError("data: missing; add data.train: path/to/train.jsonl")
    if cfg.data is not None:  # cheap file checks before the (possibly large) Hub download
        for source in (cfg.data.train, cfg.data.eval):
            if source is not None and source.is_local and not Path(source.path).expanduser().exists():
                raise ConfigError(f"data file not found: {source.path}")
    return _inspect(cfg, folder, console)


def _inspect(cfg: RunConfig, folder: FolderCheck | None, console) -> Preflight:
    # Imported only now: torch, transformers and the model modules take ~5 s to import (3.2 CPU-s), and the checks
    # above refuse a finished run or a bad folder in 0.6 s without them (issue 27: such a refusal took 100 s).
    import torch  # lazy: ~1.3 s; preflight's folder checks refuse without it (0.6 s in all)

    from lora_ft.model.loading import (  # lazy: torch + transformers, ~2.6 s; not before the folder checks
        check_device_support, check_weight_format, count_lora_params, load_model_config, load_tokenizer,
        resolve_model_source, resolve_precision,
    )
    from lora_ft.model.speed import check_speed_choices, plan_speed  # lazy: torch + transformers' modeling, ~4.6 s
    from lora_ft.model.stop_tokens import check_lines, check_stop_tokens, plan_token_training  # lazy: torch, ~2.6 s
    from lora_ft.training.advice import advise, data_size_from, shapes_from  # lazy: torch, ~2.6 s

    precision = resolve_precision(cfg.training.precision)
    check_device_support(cfg.model, precision)
    check_speed_choices(cfg)
    source = resolve_model_source(cfg.model)
    if folder is not None:  # the resolved base too (a package file, a Hub snapshot)
        check_output_path(Path(cfg.output_dir), input_paths(cfg, _model_path(source)))
    check_weight_format(cfg.model, source)
    tokenizer = load_tokenizer(cfg.model, source)
    model_config = load_model_config(cfg.model, source)
    # Stop/turn tokens whose rows the base never trained, read from the weight files before they load.
    stop_tokens = check_stop_tokens(tokenizer, source, model_config, trust_remote_code=cfg.model.trust_remote_code)
    token_training = plan_token_training(cfg.lora, stop_tokens, tokenizer)
    counts, linear, reach = count_lora_params(model_config, cfg.lora, cfg.model.trust_remote_code, token_training.peft_indices)
    # The serving targets see the rows that will actually train (auto decides that only here).
    planned = cfg.lora.model_copy(update={"train_tokens": list(token_training.tokens.values()) or "off"})
    findings = deployment_findings(cfg.serving, planned, model_config.model_type, source.gguf_file is not None)
    findings += [Finding("stop tokens", "warn" if stop_tokens.flagged else "note", line)
                 for line in check_lines(stop_tokens, token_training)]

    data = data_counts = training = data_check = None
    if cfg.data is not None and cfg.training.method == "sft":
        data = prepare_data(cfg.data, tokenizer, cfg.training.seed, model_eos=model_config.eos_token_id)
        data.require_valid()
        data_counts = data.counts()
        data_check = check_data(cfg, console=console, prepared=data)
    elif cfg.data is not None:  # preference pairs: data/pairs.py reads and encodes them (not yet once)
        data_counts = validate_preference_rows(cfg.data, tokenizer, cfg.training.seed, cfg.training.method)
        data_check = check_data(cfg, tokenizer, console=console)
    if data_check is not None:
        findings += [Finding("data check", f.level, f"{f.check} ({f.split}): {f.message}") for f in data_check.findings]
        eot = data_check.end_of_turn
        if eot is not None and eot.turns and eot.ok:
            findings.append(Finding("end of turn", "note", f"end of turn: {eot.token} trained in {eot.turns} assistant turns"))
        if not data_check.failed:
            if data is not None:
                training = data.for_training(cfg.training.max_seq_length)
            else:
                training = load_preference_data(cfg.data, tokenizer, max_seq_length=cfg.training.max_seq_length,
                                                max_prompt_length=cfg.preference.max_prompt_length, seed=cfg.training.seed,
                                                model_eos=model_config.eos_token_id)
            training.heldout_overlap = data_check.overlap.to_json() if data_check.overlap else None
            if folder is not None and folder.resume is not None and folder.resume.checkpoint is not None:
                check_same_data(folder.run, training.sources)

    weights = weights_gib(cfg, counts.total, precision)
    speed = plan_speed(cfg, model_config, weights_gib=weights, trainable=counts.trainable, precision=precision,
                       adapts_experts=reach.experts)
    memory = estimate_memory(cfg, model_config, weights=weights, trainable=counts.trainable,
                             checkpoint_layers=speed.checkpoint_layers, logits=logits_gib(cfg, model_config, precision, liger=speed.liger),
                             margin=PLANNING_MARGIN_GIB if torch.cuda.is_available() else 0.0)
    advice = advise(cfg, shapes_from(model_config, reach), data_size_from(data_check, data_counts))
    findings += [Finding("advice", f.level, f.line()) for f in advice.findings if f.level != "ok"]  # advice never blocks a run
    return Preflight(cfg, folder, source, tokenizer, model_config, counts.trainable, counts.total, linear, precision, reach,
                     stop_tokens, token_training, speed, memory, data, data_counts, training, data_check, tuple(findings), advice)


def _model_path(source) -> Path:
    return Path(source.path) / source.gguf_file if source.gguf_file else Path(source.path)


def deployment_findings(serving, lora, model_type: str | None, base_is_gguf: bool) -> list[Finding]:
    """serving.deployment's rules against the LoRA settings (serving/engines.py); raises on a refusal. With
    serving.merge_adapter: true every engine loads the merged model, so each target is checked as `merged`,
    and what the adapter alone could not do on an engine is said, not refused."""
    from lora_ft.serving.engines import check_deployment  # lazy: engines imports torch (~2.6 s); train and validate import this module
    from lora_ft.serving.engines import deployment_findings as engine_findings  # lazy: as above

    if not serving.merge_adapter:
        return [Finding("deploy", "note", note) for note in check_deployment(serving, lora, model_type, base_is_gguf)]
    merged = serving.model_copy(update={"deployment": "merged"})
    found = [Finding("deploy", "note", note) for note in check_deployment(merged, lora, model_type, base_is_gguf)]
    for target in serving.targets:
        if target in ("merged", "transformers"):
            continue
        alone = serving.model_copy(update={"deployment": target, "merge_adapter": False})
        refused = [f.text for f in engine_findings(alone, lora, model_type, base_is_gguf) if f.level == "error"]
        if refused:
            what = "stop" if "trainable-token rows" in refused[0] else "load"
            found.append(Finding("deploy", "note", f"{target} serves the merged model (serving.merge_adapter: true; loraft "
                                 f"merge); the adapter alone would not {what} on {target}: {refused[0]}"))
    return found
