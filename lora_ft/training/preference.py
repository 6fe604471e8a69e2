"""Preference training (training.method dpo | kto) on TRL's trainers, and the scores that judge it.

Where our schema meets TRL's DPOConfig/KTOConfig (`to_preference_config`), the trainer bases (`trainer_base`:
TRL's DPOTrainer/KTOTrainer taking rows already encoded by data/pairs.py), the reference model, the
log-probability watch, and the held-out preference accuracy that `train` and `eval` report.

The reference is never a second copy of the model. TRL, given a PeftModel, adds a frozen "ref" adapter that
copies the trainable one: after a fresh LoRA init that copy is a zero update, so it is dropped and the reference
is the base with the adapter disabled; when the run starts from an SFT adapter (model.adapter) the copy is kept,
so the reference is that SFT model (as the DPO and KTO papers assume), at the memory of one more adapter.
Verified against TRL 1.16 (trl/trainer/dpo_trainer.py, kto_trainer.py); pyproject pins trl <2.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from lora_ft.artifacts.adapter import read_state
from lora_ft.artifacts.adapter_run import AdapterRun
from lora_ft.config import RunConfig
from lora_ft.errors import ConfigError

# metrics.jsonl keys TRL logs, and the short names of the progress line
PROGRESS_KEYS = (("rewards/margins", "margin"), ("rewards/accuracies", "pref_acc"), ("logps/chosen", "logp_chosen"),
                 ("logps/rejected", "logp_rejected"))
FALLING_WINDOW = 5  # logging steps in a row with both log-probabilities down before the warning


def to_preference_config(cfg: RunConfig, common: dict):
    """TRL's DPOConfig / KTOConfig: the Trainer arguments SFT uses (`common`, built in one place by train.py) and
    each method's own keys. Rows arrive encoded and cut to the length limits, so TRL's own truncation is off."""
    from trl import DPOConfig, KTOConfig  # lazy: trl ~1 s; eval and inspect import this module (pair_score, progress_parts) and never train

    pref = cfg.preference
    shared = dict(common, max_length=None, disable_dropout=True, precompute_ref_log_probs=False,
                  remove_unused_columns=False, dataset_num_proc=None)
    if cfg.training.method == "dpo":
        dpo = pref.dpo
        losses, weights = [dpo.loss_type], [1.0]
        if dpo.sft_weight > 0:  # RPO: DPO plus the chosen answers' NLL, combined by TRL's loss_weights
            losses, weights = [dpo.loss_type, "sft"], [1.0, dpo.sft_weight]
        return DPOConfig(**shared, beta=dpo.beta, loss_type=losses, loss_weights=weights, label_smoothing=dpo.label_smoothing)
    return KTOConfig(**shared, beta=pref.kto.beta, loss_type="kto", desirable_weight=pref.kto.desirable_weight,
                     undesirable_weight=pref.kto.undesirable_weight)


def trainer_base(method: str):
    """TRL's trainer for the method, taking the rows data/pairs.py encoded (prompt and answer tokenized together)."""
    from trl import DPOTrainer, KTOTrainer  # lazy: trl ~1 s; eval and inspect import this module (pair_score, progress_parts) and never train

    class EncodedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    class EncodedKTOTrainer(KTOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if dataset_name == "train":
                # KTO samples in order (its KL pairs are fixed per batch), so the order is shuffled here, seeded.
                dataset = dataset.shuffle(seed=args.seed)
            if self.calculate_KL:
                # TRL's own step: each row's KL completion is its batch neighbour's (rotated by one).
                def rotate(batch):
                    return {"KL_completion_ids": [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]}

                dataset = dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)
            return dataset

    return {"dpo": EncodedDPOTrainer, "kto": EncodedKTOTrainer}[method]


def settle_reference(trainer, cfg: RunConfig) -> str:
    """Keep TRL's frozen copy of the adapter as the reference only when training starts from an SFT adapter;
    otherwise the reference is the base with the adapter disabled. Returns what the manifest records."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if cfg.model.adapter is not None:
        if "ref" not in model.peft_config:
            raise ConfigError("model.adapter: TRL did not keep a reference copy of the SFT adapter; this TRL/PEFT "
                              "version is not supported for preference tuning from an adapter")
        return f"the SFT model (base + {cfg.model.adapter}, a frozen copy of its adapter)"
    drop_reference(model)
    return "the base model (adapter disabled)"


def run_record(cfg: RunConfig, trainer, chain: list[dict]) -> dict:
    """What the manifest records about a preference run: method, its keys, the reference, the chain of runs."""
    method = cfg.training.method
    return {"method": method, "settings": getattr(cfg.preference, method).model_dump(mode="json"),
            "max_prompt_length": cfg.preference.max_prompt_length, "reference": settle_reference(trainer, cfg),
            "chain": chain, "trl": _trl_version()}


def _trl_version() -> str:
    import trl  # lazy: trl ~1 s; eval and inspect import this module (pair_score, progress_parts) and never train

    return trl.__version__


def drop_reference(model) -> None:
    """Remove TRL's frozen reference adapter (kept only while training from an SFT adapter)."""
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
        model.set_adapter("default")


# ---------------------------------------------------------------------------------------------
# Starting from an SFT run


def load_start_adapter(model, cfg: RunConfig, base_fingerprint: str) -> dict:
    """Copy a finished run's adapter weights into the freshly attached one (same lora section required), read
    through the one adapter loader (safetensors only, intact, ranks as configured). Returns the chain entry the
    manifest records."""
    from peft import set_peft_model_state_dict  # lazy: peft ~3 s + bitsandbytes notes on stderr; inspect imports this module and never trains

    run = AdapterRun.load(Path(cfg.model.adapter), "model.adapter")
    folder, manifest = run.path, run.manifest
    if manifest is None:
        raise ConfigError(f"model.adapter: {folder} is not a finished loraft run (no readable run manifest)")
    if manifest.base_model.fingerprint != base_fingerprint:
        raise ConfigError(f"model.adapter: {folder} was trained on another base (fingerprint "
                          f"{manifest.base_model.fingerprint[:12]}, model.name has {base_fingerprint[:12]}); use its base")
    saved, ours = run.adapter, model.peft_config["default"]
    mismatch = [f"{ours_key} {theirs} vs {getattr(ours, ours_key)}" for ours_key, theirs in (
        ("r", saved.rank), ("lora_alpha", saved.alpha), ("use_rslora", saved.use_rslora), ("use_dora", saved.use_dora))
        if theirs != getattr(ours, ours_key)]
    saved_targets = sorted([saved.target_modules] if isinstance(saved.target_modules, str) else saved.target_modules or [])
    if saved_targets != sorted(ours.target_modules or []):
        mismatch.append(f"target_modules {saved_targets} vs {sorted(ours.target_modules)}")
    if mismatch:
        raise ConfigError(f"model.adapter: {folder} differs from the lora section ({'; '.join(mismatch)}); set lora to "
                          "the adapter's rank, alpha, targets and variant")
    _, state = read_state(folder, "model.adapter")
    result = set_peft_model_state_dict(model, state, adapter_name="default")
    missing = [k for k in result.unexpected_keys]
    if missing:
        raise ConfigError(f"model.adapter: {len(missing)} weights of {folder} have no place in this model (first: {missing[0]})")
    return {"adapter": str(folder), "config_hash": manifest.config_hash, "created": manifest.created,
            "method": (manifest.preference or {}).get("method", "sft"), "base_fingerprint": manifest.base_model.fingerprint}


# ---------------------------------------------------------------------------------------------
# While training


class FallingLogpsCallback(TrainerCallback):
    """Warn when the chosen and the rejected log-probabilities both fall for FALLING_WINDOW logging steps in a row:
    the margin can grow while the model moves away from both answers (likelihood displacement)."""

    def __init__(self, console, metrics_path: Path | None):
        self.console, self.path = console, metrics_path
        self.history: deque = deque(maxlen=FALLING_WINDOW + 1)
        self.warned = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "logps/chosen" not in logs or not state.is_world_process_zero:
            return
        self.history.append((float(logs["logps/chosen"]), float(logs["logps/rejected"])))
        if self.warned or len(self.history) <= FALLING_WINDOW:
            return
        steps = list(self.history)
        if all(b[0] < a[0] and b[1] < a[1] for a, b in zip(steps, steps[1:])):
            self.warned = True
            first, last = steps[0], steps[-1]
            message = (f"chosen and rejected log-probabilities both fell for {FALLING_WINDOW} logging steps "
                       f"(chosen {first[0]:.2f} -> {last[0]:.2f}, rejected {first[1]:.2f} -> {last[1]:.2f}) at step "
                       f"{state.global_step}: the margin grows by pushing rejected down faster while the model moves "
                       "away from both answers; lower training.learning_rate, raise the method's beta, or start from an "
                       "SFT adapter on the chosen answers (model.adapter)")
            if self.console is not None:
                self.console.print(f"[yellow]warning: {message}[/]")
            if self.path is not None:
                with Path(self.path).open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"step": state.global_step, "warning": "logps_falling", "message": message}) + "\n")


def progress_parts(record: dict) -> list[str]:
    """The preference figures of a progress line (empty for SFT records)."""
    return [f"{short} {record[key]:.3f}" for key, short in PROGRESS_KEYS if key in record]


# ---------------------------------------------------------------------------------------------
# Held-out preference accuracy


@dataclass(frozen=True)
class PreferenceScore:
    pairs: int
    accuracy: float  # share of pairs with length-normalised log p(chosen) > log p(rejected)
    mean_margin: float  # mean of (mean log p per token, chosen) - (same, rejected)

    def to_json(self) -> dict:
        return dict(self.__dict__)


@torch.no_grad()
def answer_logps(model, prompt_ids: list[int], answers: list[list[int]], *, batch_size: int = 8) -> list[float]:
    """Mean log-probability per answer token of each answer after the prompt."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(answers), batch_size):
        chunk = answers[start:start + batch_size]
        seqs = [prompt_ids + a for a in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
        for i, a in enumerate(chunk):
            first = len(prompt_ids) - 1
            out.append(float(logps[i, first:first + len(a)].mean()) if a else float("nan"))
    return out


def pair_score(model, encoded, *, batch_size: int = 8) -> PreferenceScore | None:
    """Preference accuracy and mean margin of the model as it is (adapter on or off is the caller's) on encoded pairs."""
    pairs = [e for e in encoded if e.rejected_ids is not None and e.chosen_ids and e.rejected_ids]
    if not pairs:
        return None
    was_training = model.training
    model.eval()
    margins = []
    for e in pairs:
        chosen, rejected = answer_logps(model, e.prompt_ids, [e.chosen_ids, e.rejected_ids], batch_size=batch_size)
        margins.append(chosen - rejected)
    model.train(was_training)
    finite = [m for m in margins if math.isfinite(m)]
    return PreferenceScore(len(pairs), sum(1 for m in finite if m > 0) / len(pairs), sum(finite) / max(len(finite), 1))


def preference_scores(model, data, *, batch_size: int) -> dict:
    """Base (adapter disabled) and adapter on the held-out pairs; {} without eval pairs."""
    if data.eval is None:
        return {}
    with model.disable_adapter():
        base = pair_score(model, data.eval.encoded, batch_size=batch_size)
    adapter = pair_score(model, data.eval.encoded, batch_size=batch_size)
    if base is None or adapter is None:
        return {}
    return {"base": base.to_json(), "adapter": adapter.to_json()}


def preference_summary(scores: dict) -> list[str]:
    if not scores:
        return ["preference      (no held-out pairs scored: accuracy needs prompt/chosen/rejected eval rows; set data.eval "
                "or data.eval_fraction; KTO's unpaired rows are not scored)"]
    b, a = scores["base"], scores["adapter"]
    return [f"preference      held-out accuracy base {b['accuracy']:.1%} -> adapter {a['accuracy']:.1%}, mean margin "
            f"{b['mean_margin']:+.3f} -> {a['mean_margin']:+.3f} (length-normalised log p, {a['pairs']} pairs)"]
