"""The config schema: what users write validates; what they get wrong fails with one line naming key and fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from lora_ft.config_io import load_config, redact, reference_yaml, validate_dict
from lora_ft.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

REFERENCE_YAML = """
model:
  name: meta-llama/Llama-3.1-8B
  dtype: bfloat16
lora:
  rank: 16
  alpha: 32
  dropout: 0.05
  target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
  bias: none
  task_type: CAUSAL_LM
training:
  epochs: 3
  batch_size: 4
  gradient_accumulation_steps: 4
  learning_rate: 2e-4
  warmup_ratio: 0.03
  lr_scheduler: cosine
  max_seq_length: 2048
  gradient_checkpointing: true
  bf16: true
serving:
  merge_adapter: true
  deployment: vllm
  quantization: none
"""


def _error(tmp_path, text: str, *overrides: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_the_users_reference_yaml_validates_as_written(tmp_path):
    path = tmp_path / "ref.yaml"
    path.write_text(REFERENCE_YAML)
    cfg = load_config(path)
    assert cfg.training.learning_rate == pytest.approx(2e-4)  # YAML 1.1 reads 2e-4 as a string
    assert cfg.training.precision == "bf16"
    assert cfg.training.warmup_ratio == 0.03
    assert cfg.lora.scaling == 2.0
    assert cfg.serving.merge_adapter and cfg.serving.deployment == "vllm"
    assert cfg.output_dir == "runs/ref"


def test_defaults_follow_current_practice():
    cfg = validate_dict({"model": {"name": "m"}})
    assert (cfg.lora.rank, cfg.lora.resolved_alpha, cfg.lora.dropout) == (16, 32.0, 0.05)
    assert cfg.lora.target_modules == "all-linear"
    assert (cfg.training.learning_rate, cfg.training.lr_scheduler, cfg.training.warmup_ratio) == (2e-4, "cosine", 0.03)
    assert cfg.training.gradient_checkpointing == "auto"  # planned by memory: all layers on a small card, none on a large one
    assert cfg.model.trust_remote_code is False


@pytest.mark.parametrize(
    "override, message",
    [
        ("lora.rnak=8", "lora.rnak: unknown key; did you mean 'rank'?"),
        ("lora.r=8", "lora.r: unknown key; did you mean 'rank'?"),
        ("lora.lora_alpha=8", "lora.lora_alpha: unknown key; did you mean 'alpha'?"),
        ("training.lr=1e-4", "training.lr: unknown key; did you mean 'learning_rate'?"),
        ("training.num_train_epochs=2", "did you mean 'epochs'?"),
        ("lora.max_seq_length=512", "lora.max_seq_length: unknown key; it belongs at training.max_seq_length"),
        ("training.sequence_len=512", "did you mean 'max_seq_length'?"),
        ("lora.rank=0", "lora.rank: input should be greater than or equal to 1"),
        ("lora.alpha=0", "lora.alpha: input should be greater than 0"),
        ("lora.dropout=1", "lora.dropout: input should be less than 1"),
        ("lora.dropout=-0.1", "lora.dropout: input should be greater than or equal to 0"),
        ("training.batch_size=four", "training.batch_size: input should be a valid integer"),
        ("training.lr_scheduler=exp", "training.lr_scheduler: should be 'cosine', 'linear', 'constant' or 'constant_with_warmup'"),
        ("lora.target_modules=q", "lora.target_modules: 'q' is neither a list of module names"),
        ("model.quantization.bits=3", "model.quantization.bits: should be 4 or 8"),
    ],
)
def test_bad_keys_and_values_name_the_key_and_the_fix(tmp_path, override, message):
    text = _error(tmp_path, REFERENCE_YAML, override)
    assert message in text
    assert len(text.splitlines()) == 1


def test_impossible_combinations_are_refused(tmp_path):
    assert "bf16: true contradicts precision: fp16" in _error(tmp_path, REFERENCE_YAML, "training.precision=fp16")
    both = REFERENCE_YAML + "data:\n  train: a.jsonl\n  eval: b.jsonl\n  eval_fraction: 0.1\n"
    assert "either data.eval or data.eval_fraction" in _error(tmp_path, both)
    assert "needs training.eval_steps" in _error(tmp_path, REFERENCE_YAML, "training.early_stopping_patience=2")


def test_yaml_problems_are_one_line_errors(tmp_path):
    assert "not valid YAML" in _error(tmp_path, "model: [unclosed\n")
    assert "the file is empty" in _error(tmp_path, "")
    assert "must be a mapping" in _error(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_set_overrides_are_typed_and_validated_like_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(REFERENCE_YAML)
    cfg = load_config(path, ["training.max_steps=10", "lora.rank=8", "data.train=x.jsonl", "model.name=/tmp/m"])
    assert (cfg.training.max_steps, cfg.lora.rank, cfg.data.train.path, cfg.model.name) == (10, 8, "x.jsonl", "/tmp/m")
    assert "expected dotted.key=value" in _error(tmp_path, REFERENCE_YAML, "training.max_steps")


def test_config_is_frozen_after_validation():
    cfg = validate_dict({"model": {"name": "m"}})
    with pytest.raises(ValidationError, match="frozen"):
        cfg.lora.rank = 4
    assert cfg.lora.rank != 4


def test_secrets_are_redacted():
    data = {"model": {"name": "https://user:s3cret@example.com/m"}, "wandb_api_key": "abc", "note": "hf_" + "a" * 30}
    out = redact(data)
    assert "s3cret" not in str(out) and out["wandb_api_key"] == "***" and out["note"] == "***"


def test_reference_yaml_lists_every_key_and_is_in_sync():
    committed = (REPO / "configs" / "reference.yaml").read_text()
    assert committed == reference_yaml(), "regenerate: python -m lora_ft.config_io > configs/reference.yaml"
    for key in ("rank:", "alpha:", "target_modules:", "learning_rate:", "gradient_checkpointing:", "packing:", "train_on:"):
        assert key in committed


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml") if p.name != "reference.yaml"))
def test_shipped_configs_validate(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.data is not None and cfg.lora.rank >= 1


def test_validate_command_checks_the_reference_yaml_without_loading_weights(tmp_path, tiny_model_dir, run_cli):
    path = tmp_path / "ref.yaml"
    path.write_text(REFERENCE_YAML)
    code, out, err = run_cli("validate", path, "--set", f"model.name={tiny_model_dir}")
    assert code == 0, err
    assert "trainable" in out and "memory" in out and "ok: config is valid" in out
    code, out, err = run_cli("validate", path, "--set", f"model.name={tiny_model_dir}", "--set", "lora.target_modules=[wq, wk]")
    assert code == 2
    assert "lora.target_modules: wq, wk not in this model; its linear layers are: down_proj, gate_proj" in err
