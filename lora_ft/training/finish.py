"""The end of a run: held-out scores of base and adapter, then the finished run folder.

`score_heldout` measures on the prepared eval rows exactly what `loraft eval` measures on them (the same
heldout_loss and stop_score over the same encoded rows; tests/test_train.py holds the two equal). `finalize`
writes every file through a staging folder and the typed manifest last.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_ft import __version__
from lora_ft.artifacts.manifests import (
    BaseModelRecord, ChatRecord, DataRecord, DistributedRecord, LoraRecord, MetricsRecord, RunManifest, write_manifest,
)
from lora_ft.artifacts.manifests import AdviceRecord
from lora_ft.artifacts.run_dir import METRICS
from lora_ft.config import RunConfig
from lora_ft.data.chat_template import generation_config
from lora_ft.metrics import heldout_loss
from lora_ft.model.coverage import parameter_wrappers
from lora_ft.model.rank_stats import adapter_statistics, model_weight_norms
from lora_ft.model.stop_tokens import stop_score, stop_warning
from lora_ft.rank_diagnostics import gradient_report, run_outcome
from lora_ft.training.advice import after_run
from lora_ft.training.distributed import effective_batch, world_size
from lora_ft.training.fit import INITIAL_ADAPTER, LoadedModel, RunStart, config_hash
from lora_ft.training.preflight import Preflight
from lora_ft.training import preference
from lora_ft.training.progress import peak_gpu_gib, plot_loss_curve, read_metrics


@dataclass(frozen=True)
class HeldOut:
    scores: dict  # {"base": HeldoutScore, "adapter": HeldoutScore}; {} without eval rows (or for preference runs)
    stop: dict  # stop-token probability at the end of held-out answers, base and adapter, and a warning
    preference: dict | None = None  # preference runs: method, reference, chain, held-out preference accuracy


def score_heldout(check: Preflight, loaded: LoadedModel, record: dict | None = None) -> HeldOut:
    """Held-out figures of base and adapter on the prepared eval rows; `record`: a preference run's record
    (training/preference.py run_record), scored on held-out pairs instead."""
    model, data, batch = loaded.model, check.training_data, check.cfg.training.batch_size
    model.eval()
    if record is not None:
        record = {**record, "heldout": preference.preference_scores(model, data, batch_size=batch)}
        preference.drop_reference(model)  # the SFT reference copy is not part of what the run folder holds
        return HeldOut({}, {}, record)
    scores = final_scores(model, data, check.tokenizer, batch)
    if scores and loaded.original:  # PiSSA/OLoRA: with the adapter disabled the model is the residual, not the base
        scores["base"] = loaded.original["heldout"]
    return HeldOut(scores, stop_after_training(model, data, check, batch))


def final_scores(model, data, tokenizer, batch_size: int) -> dict:
    """Held-out loss of the base (adapter disabled) and of the adapter, on the same tokens."""
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
    if data.eval is None:
        return {}
    ids, pad = list(data.conversation.stop_ids), check.tokenizer.pad_token_id  # the ids eval, generate and serve stop on
    base = stop_score(model, data.eval.encoded, ids, pad_token_id=pad, batch_size=batch_size, disable_adapter=True)
    adapter = stop_score(model, data.eval.encoded, ids, pad_token_id=pad, batch_size=batch_size)
    if adapter is None:
        return {}
    return {"stop_ids": ids, "base": base.to_json(), "adapter": adapter.to_json(),
            "warning": stop_warning(adapter, check.stop_tokens, check.token_training)}


def finalize(start: RunStart, check: Preflight, loaded: LoadedModel, trainer, heldout: HeldOut) -> RunManifest:
    """Write the adapter, tokenizer, generation config, loss curve and card through a staging folder, then the
    typed manifest last: a run folder with a manifest is a finished run."""
    cfg, data, run, speed = check.cfg, check.training_data, start.run, loaded.speed
    scores, stop, original = heldout.scores, heldout.stop, loaded.original

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
        wall_seconds=round(time.time() - start.started, 1),
        config_hash=config_hash(cfg),
        base_model=BaseModelRecord(
            name=cfg.model.name,
            revision=cfg.model.revision,
            resolved_path=check.source.display,
            fingerprint=loaded.base_fingerprint,
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
        preference=heldout.preference,
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
    before = advice.findings if advice is not None else ()
    relative = stats["mean_relative_norm"]
    outcome = run_outcome(cfg.lora.rank, stats["verdict"], stats["median_rank_used"], relative,
                          gradient_report(history, relative), history)
    return AdviceRecord(before=list(before), after=list(after_run(outcome, before, cfg.advice.off)), off=list(cfg.advice.off))


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

