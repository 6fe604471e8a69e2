"""Speed choices never change the math: loraft's path trains like plain PEFT + TRL, packing keeps rows apart."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_llama, build_tokenizer
from lora_ft.config_io import validate_dict
from lora_ft.model.speed import SpeedPlan, _layers_to_checkpoint, activation_gib_per_layer, apply_checkpointing, apply_speed_plan
from lora_ft.training.sft import _CHECKPOINTING  # the Trainer argument's name in the installed transformers


def _losses(model, rows, tokenizer, tmp_path, name):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(tmp_path / name), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", bf16=False, fp16=False, use_cpu=True, report_to="none",
        max_length=64, seed=0, dataset_kwargs={"skip_prepare_dataset": True}, disable_tqdm=True,
        **{_CHECKPOINTING: False}, lr_scheduler_type="constant", warmup_steps=0,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_loraft_path_gives_the_same_losses_as_plain_peft_trl(tmp_path):
    from peft import LoraConfig, get_peft_model

    from lora_ft.model.loading import attach_lora

    tokenizer = build_tokenizer()
    g = torch.Generator().manual_seed(0)
    motifs = [torch.randint(5, 300, (8,), generator=g) for _ in range(3)]  # a few rows to memorise: loss falls
    rows = [{"input_ids": motifs[i % 3].repeat(4).tolist()} for i in range(24)]
    for row in rows:
        row["labels"] = list(row["input_ids"])

    plain = build_tiny_llama(tokenizer, seed=3)
    torch.manual_seed(0)
    plain = get_peft_model(plain, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    if hasattr(plain, "activation_checkpointing_enable"):  # transformers 5.2x's name; 5.17 has only the old one
        plain.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        plain.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = _losses(plain, rows, tokenizer, tmp_path, "plain")

    cfg = validate_dict({"model": {"name": "x"}, "lora": {"rank": 4, "alpha": 8, "dropout": 0.0}})
    ours = build_tiny_llama(tokenizer, seed=3)
    torch.manual_seed(0)
    ours = attach_lora(ours, cfg.lora)
    # fused LoRA projections; checkpoint one of the two layers, keep the other's activations
    apply_speed_plan(ours, SpeedPlan(liger=False, checkpoint_layers=1, total_layers=2, optimizer="adamw_torch"))
    assert all(hasattr(m, "_loraft_peft_forward") for n, m in ours.named_modules() if n.endswith("q_proj"))
    optimised = _losses(ours, rows, tokenizer, tmp_path, "ours")

    assert len(reference) == len(optimised) == 6
    assert reference[-1] < reference[0]
    assert optimised == pytest.approx(reference, rel=1e-5)


def test_checkpointing_does_not_change_fused_dropout(tmp_path):
    """Recomputed layers redraw the very dropout masks of the first forward: checkpointing all, one or no
    layers gives the same losses with dropout on."""
    from lora_ft.model.loading import attach_lora

    tokenizer = build_tokenizer()
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(5, 300, (32,), generator=g).tolist()} for _ in range(24)]
    for row in rows:
        row["labels"] = list(row["input_ids"])
    cfg = validate_dict({"model": {"name": "x"}, "lora": {"rank": 4, "alpha": 8, "dropout": 0.2}})
    curves = []
    for checkpointed in (0, 1, 2):
        model = build_tiny_llama(tokenizer, seed=3)
        torch.manual_seed(0)
        model = attach_lora(model, cfg.lora)
        apply_speed_plan(model, SpeedPlan(liger=False, checkpoint_layers=checkpointed, total_layers=2, optimizer="adamw_torch"))
        curves.append(_losses(model, rows, tokenizer, tmp_path, f"gc{checkpointed}"))
    assert curves[1] == pytest.approx(curves[0], rel=1e-6)
    assert curves[2] == pytest.approx(curves[0], rel=1e-6)


def test_partial_checkpointing_flags_exactly_the_first_layers():
    tokenizer = build_tokenizer()
    model = build_tiny_llama(tokenizer, layers=4)
    apply_checkpointing(model, 3)
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [True, True, True, False]


def test_packed_rows_do_not_attend_across_examples():
    """Padding-free packing: two rows in one sequence with restarting position_ids give each row's own logits,
    once loraft has prepared the model for training (a live KV cache would hide the row boundaries)."""
    tokenizer = build_tokenizer()
    model = build_tiny_llama(tokenizer, seed=5)
    apply_checkpointing(model, 0)
    assert model.config.use_cache is False
    a = torch.randint(5, 300, (1, 9), generator=torch.Generator().manual_seed(1))
    b = torch.randint(5, 300, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        alone_a = model(input_ids=a).logits
        alone_b = model(input_ids=b).logits
        packed_ids = torch.cat([a, b], dim=1)
        positions = torch.cat([torch.arange(9), torch.arange(7)])[None]
        packed = model(input_ids=packed_ids, position_ids=positions).logits
    assert torch.allclose(packed[:, :9], alone_a, atol=1e-5)
    assert torch.allclose(packed[:, 9:], alone_b, atol=1e-5)


def test_auto_checkpointing_keeps_more_layers_as_the_budget_grows():
    from transformers import LlamaConfig

    shape = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, vocab_size=128256)
    per_layer = activation_gib_per_layer(shape, 4 * 2048, fused_lora=False)
    assert 1.2 < per_layer < 1.6  # calibrated against 47.9 GiB / 32 layers measured on an H100 (PEFT's LoRA)
    assert activation_gib_per_layer(shape, 4 * 2048) < 0.8 * per_layer  # fused LoRA keeps no masks or copies

    def plan(budget):
        cfg = validate_dict({"model": {"name": "x"}, "training": {"batch_size": 4, "max_seq_length": 2048, "fused_lora": False,
                                                                   "gradient_checkpointing": "auto", "memory_budget_gib": budget}})
        return _layers_to_checkpoint(cfg, shape, 32, weights_gib=15.0, trainable=42_000_000)

    assert plan(21) == 32  # too tight: every layer recomputed
    assert 0 < plan(45) < 32
    assert plan(72) == 0  # an 80 GB card holds every layer's activations at 4 x 2048
    assert plan(30) > plan(45) > plan(60)


def _motif_rows(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    motifs = [torch.randint(5, 300, (8,), generator=g) for _ in range(3)]
    rows = [{"input_ids": motifs[i % 3].repeat(4).tolist()} for i in range(n)]
    for row in rows:
        row["labels"] = list(row["input_ids"])
    return rows


def _train_logs(trainer_class, tmp_path, name, rows, *, steps=5, logging_steps=1, callbacks=(), **extra):
    """Logged records of a short fused-AdamW run of the tiny model with dropout-free LoRA."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import SFTConfig

    tokenizer = build_tokenizer()
    model = build_tiny_llama(tokenizer, seed=3)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    args = SFTConfig(
        output_dir=str(tmp_path / name), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=logging_steps, save_strategy="no", bf16=False, fp16=False, use_cpu=True, report_to="none",
        max_length=64, seed=0, dataset_kwargs={"skip_prepare_dataset": True}, disable_tqdm=True,
        lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch_fused", include_num_input_tokens_seen="non_padding",
        logging_nan_inf_filter=trainer_class.__name__ != "LoraftTrainer", **{_CHECKPOINTING: False},
    )
    trainer = trainer_class(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                            callbacks=list(callbacks), **extra)
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def _loraft_trainer_kwargs():
    from rich.console import Console

    from lora_ft.training.guards import NumericGuard

    return {"writer": None, "guard": NumericGuard("stop", 0, None, Console(stderr=True), "")}


def test_loraft_trainer_logs_what_trl_logs(tmp_path):
    """Deferring the per-step reads changes no number: loss, gradient norm, entropy, token accuracy and both
    token counts are TRL's own, step by step."""
    from trl import SFTTrainer

    from lora_ft.training.sft import LoraftTrainer

    rows = _motif_rows()
    reference = _train_logs(SFTTrainer, tmp_path, "trl", rows)
    ours = _train_logs(LoraftTrainer, tmp_path, "ours", rows, **_loraft_trainer_kwargs())
    keys = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens", "num_input_tokens_seen")
    assert len(reference) == len(ours) == 5
    assert reference[-1]["loss"] < reference[0]["loss"]
    for theirs, mine in zip(reference, ours):
        assert {k: mine[k] for k in keys} == pytest.approx({k: theirs[k] for k in keys}, rel=1e-6)


def test_a_training_step_reads_nothing_back_from_the_device(tmp_path, monkeypatch):
    """Between logging steps loraft's Trainer never turns a tensor into a Python number (each such read waits for
    the GPU); TRL's SFTTrainer does several times a step. Counted: Tensor.item/tolist/__bool__/__float__/__int__
    from step begin to step end (logging, evaluation and saving happen after step end), except the model's own:
    transformers' attention-mask builder asks once a forward whether the padding mask is all ones."""
    import traceback

    from transformers import TrainerCallback
    from trl import SFTTrainer

    from lora_ft.training.sft import LoraftTrainer

    counting = {"on": False, "reads": 0}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            if counting["on"] and not any(f.filename.endswith("masking_utils.py") for f in traceback.extract_stack()):
                counting["reads"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    class Window(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            counting["on"] = True

        def on_step_end(self, args, state, control, **kwargs):
            counting["on"] = False

    def reads(trainer_class, name, **extra):
        counting["reads"] = 0
        _train_logs(trainer_class, tmp_path, name, _motif_rows(), steps=4, logging_steps=100, callbacks=[Window()], **extra)
        return counting["reads"]

    assert reads(SFTTrainer, "trl") >= 4 * 3  # entropy, accuracy and token count, at least, every step
    assert reads(LoraftTrainer, "ours", **_loraft_trainer_kwargs()) == 0


def test_the_default_plans_checkpointing_by_memory_and_shipped_configs_use_it():
    from transformers import LlamaConfig

    from lora_ft.config_io import load_config

    assert validate_dict({"model": {"name": "x"}}).training.gradient_checkpointing == "auto"
    for name in ("llama8b", "llama8b-qlora"):
        assert load_config(f"configs/{name}.yaml").training.gradient_checkpointing == "auto"
    # QLoRA 8B at batch 4 x 2048 on a 24 GB card (90% budget): most layers recomputed, and what the plan keeps
    # (4-bit weights ~5.5 GiB, LoRA state, the layers left unrecomputed, every layer's input) fits the budget.
    shape = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, vocab_size=128256)
    cfg = validate_dict({"model": {"name": "x", "quantization": {"bits": 4}},
                         "training": {"batch_size": 4, "max_seq_length": 2048, "memory_budget_gib": 0.9 * 24}})
    recomputed = _layers_to_checkpoint(cfg, shape, 32, weights_gib=5.5, trainable=42_000_000)
    kept = 32 - recomputed
    per_layer, boundary = activation_gib_per_layer(shape, 8192), 8192 * 4096 * 2 / 2**30
    planned = 5.5 + 42_000_000 * 16 / 2**30 + per_layer + 32 * boundary + kept * (per_layer - boundary)
    assert 16 <= recomputed < 32 and planned <= 0.9 * 24


def test_padding_free_batches_train_the_same_rows_to_the_same_losses(tiny_config, monkeypatch):
    """data.padding_free (the default) runs each batch's rows back to back in one sequence, no padding; the rows per
    step and the per-token loss are those of padded batches, so the loss curve is the same."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from lora_ft.config_io import validate_dict
    from lora_ft.train import train
    from lora_ft.training.progress import read_metrics

    shapes = []
    collate = DataCollatorForLanguageModeling.torch_call

    def recording(self, examples):
        batch = collate(self, examples)
        shapes.append((tuple(batch["input_ids"].shape), sum(len(e["input_ids"]) for e in examples), "position_ids" in batch))
        return batch

    monkeypatch.setattr(DataCollatorForLanguageModeling, "torch_call", recording)
    losses = {}
    for flag in (True, False):
        raw = {**tiny_config, "output_dir": f"{tiny_config['output_dir']}-{flag}"}
        raw["data"] = {**raw["data"], "eval": None, "eval_fraction": 0.0, "padding_free": flag}
        raw["training"] = {**raw["training"], "max_steps": 4, "logging_steps": 1, "batch_size": 4}
        result = train(validate_dict(raw), overwrite=True)
        assert result.manifest.speed["batching"] == ("padding-free" if flag else "padded")
        losses[flag] = [r["loss"] for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]
        if flag:
            # one sequence per batch, exactly as long as its rows together, with positions restarting per row
            assert shapes and all(shape == (1, tokens) and has_positions for shape, tokens, has_positions in shapes)
        else:
            assert any(shape[0] == 4 and shape[0] * shape[1] > tokens for shape, tokens, _ in shapes)  # padding
        shapes.clear()
    assert len(losses[True]) == 4
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_padding_free_is_on_by_default_only_with_a_varlen_attention_kernel():
    from lora_ft.model.speed import batching

    def plan(**data_and_model):
        model = {"name": "x", **data_and_model.pop("model", {})}
        return batching(validate_dict({"model": model, "data": {"train": "t.jsonl", **data_and_model}}))

    assert plan() == "padded"  # sdpa (transformers' default): rows would share one masked sequence
    assert plan(model={"attn_implementation": "flash_attention_2"}) == "padding-free"
    assert plan(padding_free=True) == "padding-free"
    assert plan(model={"attn_implementation": "flash_attention_2"}, padding_free=False) == "padded"
    assert plan(packing=True) == "packed"


def test_a_sequence_that_cannot_fit_is_refused_up_front_with_the_longest_that_does():
    from transformers import LlamaConfig

    from lora_ft.errors import ConfigError
    from lora_ft.model.speed import check_fits

    shape = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, vocab_size=128256)

    def cfg(seq, batch=1, **training):
        return validate_dict({"model": {"name": "x", "quantization": {"bits": 4}}, "training": {
            "batch_size": batch, "max_seq_length": seq, **training}})

    qlora = dict(weights_gib=5.6, trainable=42_000_000, gpu_gib=139.0)  # Llama-3.1-8B in 4-bit on an H200
    check_fits(cfg(262_144), shape, **qlora)  # measured to train on the card (issue 25)
    check_fits(cfg(2048, batch=4), shape, weights_gib=15.0, trainable=42_000_000, gpu_gib=24.0)  # bf16 on a 24 GB card
    with pytest.raises(ConfigError, match=r"max_seq_length 524288 at batch_size 1 needs at least \d+ GiB") as refused:
        check_fits(cfg(524_288), shape, **qlora)
    longest = int(str(refused.value).split("The longest that fits: max_seq_length ")[1].split()[0])
    assert 262_144 <= longest < 524_288 and longest % 1024 == 0
    check_fits(cfg(longest), shape, **qlora)  # the length it names does pass
    check_fits(cfg(524_288, activation_offloading=True), shape, **qlora)  # layer inputs on the host: not modelled


def test_liger_keeps_its_swiglu_patch_off_when_lora_reaches_a_moes_routed_experts(monkeypatch):
    """Liger's SwiGLU patch swaps a MoE's experts forward for a fused kernel over the raw expert weights: with LoRA
    on the experts (PEFT's ParamWrapper) it failed on the H200 ('ParamWrapper' has no 'hidden_dim'), or would
    drop their update. Its other kernels stay on; a dense model keeps all of them."""
    from types import SimpleNamespace

    from transformers import LlamaConfig

    from lora_ft.model import speed
    from lora_ft.training.sft import trainer_arguments

    monkeypatch.setattr(speed, "liger_available", lambda: True)  # a CUDA machine with liger-kernel
    cfg = validate_dict({"model": {"name": "m"}, "training": {"gradient_checkpointing": False}})
    model_config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    run = SimpleNamespace(checkpoints="unused")

    moe = speed.plan_speed(cfg, model_config, adapts_experts=True, precision="fp32")
    assert moe.liger and not moe.liger_swiglu and "SwiGLU kept off" in moe.summary()
    assert trainer_arguments(cfg, run, "fp32", moe, has_eval=False)["liger_kernel_config"] == {"swiglu": False}
    dense = speed.plan_speed(cfg, model_config, precision="fp32")
    assert dense.liger and dense.liger_swiglu and dense.summary().count("liger on,") == 1
    assert trainer_arguments(cfg, run, "fp32", dense, has_eval=False)["liger_kernel_config"] is None
