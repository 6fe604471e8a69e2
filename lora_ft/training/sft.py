"""Where our schema meets TRL: `trainer_arguments` sets every TRL/Trainer default we depend on explicitly (TRL
turns bf16 on by default even on a CPU; precision is resolved once in the pre-flight and recorded), and
`LoraftTrainer` adds atomic, validated checkpoints and a finiteness check on every optimizer step.

`build_trainer` is the train recipe's trainer-building stage, the one place a training method is dispatched:
SFT here, DPO/KTO through training/preference.py (their TRL trainer under the same checkpointing mixin).
"""

from __future__ import annotations

import dataclasses
from functools import cache

import torch
from transformers import EarlyStoppingCallback, PrinterCallback, TrainingArguments
from trl import SFTConfig, SFTTrainer

from lora_ft.artifacts.checkpoints import CheckpointWriter, is_disk_full
from lora_ft.artifacts.run_dir import METRICS, RunDir
from lora_ft.config import RunConfig
from lora_ft.model.speed import SyncFreeSteps
from lora_ft.training import preference
from lora_ft.training.distributed import is_main_process
from lora_ft.training.guards import NumericGuard, SignalCallback
from lora_ft.training.progress import MetricsCallback

# transformers 5.2x names the Trainer's checkpointing switch activation_checkpointing (gradient_checkpointing
# is its deprecated alias); 5.17, the oldest we support, knows only gradient_checkpointing.
_CHECKPOINTING = next(
    name for name in ("activation_checkpointing", "gradient_checkpointing")
    if name in {f.name for f in dataclasses.fields(TrainingArguments)}
)


class CheckpointedTraining:
    """A TRL trainer whose checkpoints are staged and committed whole (checkpoints.CheckpointWriter), and whose
    numeric guard runs after every backward (with SyncFreeSteps)."""

    def __init__(self, *args, writer: CheckpointWriter, guard: NumericGuard, **kwargs):
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


class LoraftTrainer(CheckpointedTraining, SyncFreeSteps, SFTTrainer):
    """SFT: TRL's SFTTrainer with our checkpoints and guard."""


@cache
def trainer_class(method: str) -> type:
    """LoraftTrainer for SFT; for DPO/KTO, TRL's preference trainer under the same mixins (built once per method)."""
    if method == "sft":
        return LoraftTrainer
    base = preference.trainer_base(method)
    return type(f"Loraft{base.__name__}", (CheckpointedTraining, SyncFreeSteps, base), {})


def build_trainer(cfg: RunConfig, check, model, data, run: RunDir, console, speed, signals, command: str):
    """The Trainer for this run: our callbacks (metrics, signals, early stopping), checkpoint writer and guard."""
    method, has_eval = cfg.training.method, data.eval is not None
    if method == "sft":
        # The pad token reaches TRL through the tokenizer (processing_class): loading.load_tokenizer always sets one.
        args = to_sft_config(cfg, run, check.precision, speed, has_eval=has_eval)
    else:
        args = preference.to_preference_config(cfg, trainer_arguments(cfg, run, check.precision, speed, has_eval=has_eval))
    callbacks = [MetricsCallback(run.path / METRICS, console), SignalCallback(signals)]
    if method != "sft":
        callbacks.append(preference.FallingLogpsCallback(console, run.path / METRICS if is_main_process() else None))
    if cfg.training.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.training.early_stopping_patience))
    hint = (
        f"The last good checkpoint is kept: to step over such batches set training.nan_policy: skip and rerun "
        f"`{command}`; to change learning rate or alpha, start over with `{command} --overwrite`"
    )
    trainer = trainer_class(method)(
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


def to_sft_config(cfg: RunConfig, run: RunDir, precision: str, speed, *, has_eval: bool) -> SFTConfig:
    """TRL's SFTConfig from our schema; every default we rely on is stated here."""
    return SFTConfig(
        **trainer_arguments(cfg, run, precision, speed, has_eval=has_eval),
        # Rows arrive tokenized, labelled and truncated by data/prepared.py; TRL only packs when asked. Padding-free
        # without packing: TRL refuses a max_length it would not enforce; the rows are already cut to it.
        max_length=None if speed.batching == "padding-free" else cfg.training.max_seq_length,
        packing=cfg.data.packing,
        padding_free=speed.batching == "padding-free",
        dataset_kwargs={"skip_prepare_dataset": not cfg.data.packing},
    )


def trainer_arguments(cfg: RunConfig, run: RunDir, precision: str, speed, *, has_eval: bool) -> dict:
    """The Trainer arguments every method shares (SFT here, DPO/KTO in training/preference.py)."""
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
        # Checkpointing is set per layer by speed.apply_speed_plan before the Trainer sees the model (TRL's default
        # is on).
        **{_CHECKPOINTING: False},
        use_liger_kernel=speed.liger,
        liger_kernel_config=None if speed.liger_swiglu else {"swiglu": False},  # see SpeedPlan.liger_swiglu
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
