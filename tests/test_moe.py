"""MoE models (routed experts fused into 3-D parameters in transformers 5): loraft trains, finishes, merges,
inspects and evaluates them, and says which blocks the adapter reaches, so experts are never frozen or
trained without the user seeing it. Tiny Qwen3-MoE and Qwen2-MoE (with a shared expert) built in the test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tokenizer, copy_rows, write_jsonl

EXPERTS = 4


def save_moe(path: Path, family: str) -> Path:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    tokenizer = build_tokenizer()
    common = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, initializer_range=0.2,
        num_experts=EXPERTS, num_experts_per_tok=2, moe_intermediate_size=24,  # gate_up 48 rows: not square
    )
    if family == "qwen3_moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, head_dim=8))
    else:
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**common, shared_expert_intermediate_size=40))
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():  # transformers 5 leaves fused expert tensors uninitialised
            param.normal_(0, 0.2) if param.dim() > 1 else param.fill_(1.0)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {family: save_moe(root / family, family) for family in ("qwen3_moe", "qwen2_moe")}


def moe_config(tmp_path: Path, model_dir: Path, **lora) -> dict:
    return {
        "model": {"name": str(model_dir)},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, **lora},
        "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", copy_rows(16))),
                 "eval": str(write_jsonl(tmp_path / "eval.jsonl", copy_rows(4, 3))), "checks": {"leakage": "warn"}},
        "training": {"max_steps": 4, "eval_steps": 4, "batch_size": 8, "learning_rate": 3e-2, "max_seq_length": 48, "logging_steps": 2,
                     "precision": "fp32", "warmup_ratio": 0.0},
        "output_dir": str(tmp_path / "run"),
    }


def shares(manifest: dict) -> dict[str, float]:
    return {b["block"]: b["share"] for b in manifest["lora"]["coverage"]["blocks"]}


def test_plain_peft_all_linear_leaves_qwen2_moe_experts_frozen(moe_dirs):
    """The silent failure loraft guards against: PEFT's all-linear reaches Qwen2-MoE's shared expert but
    not one routed expert (its transformers-4 rewrite covers Qwen3-MoE and Mixtral, not Qwen2-MoE)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(moe_dirs["qwen2_moe"])
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    trained = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("shared_expert." in n for n in trained)
    assert not any(".experts." in n for n in trained)


def test_validate_reports_the_share_of_each_block_the_targets_reach(moe_dirs, write_yaml, tmp_path, run_cli):
    config = write_yaml(moe_config(tmp_path, moe_dirs["qwen2_moe"]))
    code, out, _ = run_cli("validate", config)
    assert code == 0
    assert "attention 100% · routed experts 100% · shared experts 100% · router 0% · embeddings 0%" in out
    assert "routed experts ADAPTED (down_proj, gate_up_proj" in out and "router frozen" in out

    code, out, _ = run_cli("validate", config, "--set", "lora.target_experts=false", "--set", "lora.target_router=true")
    assert code == 0
    assert "routed experts 0% · shared experts 100% · router 100%" in out
    assert "routed experts FROZEN" in out and "router ADAPTED" in out


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_default_dropout_with_experts_is_a_config_error_naming_the_fix(family, moe_dirs, write_yaml, tmp_path, run_cli):
    config = moe_config(tmp_path, moe_dirs[family])
    del config["lora"]["dropout"]  # the default, 0.05
    for command in ("validate", "train"):
        code, _, err = run_cli(command, write_yaml(config))
        assert code == 2
        assert err.strip().splitlines() == [
            "error: lora.dropout: 0.05 cannot apply to the routed experts of this MoE model (PEFT adapts fused expert "
            "weights without dropout); set lora.dropout: 0, or lora.target_experts: false to leave the experts frozen"
        ]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_run_reaching_the_experts_trains_every_expert_then_merges_inspects_and_evals(
    family, moe_dirs, write_yaml, tmp_path, run_cli
):
    config = write_yaml(moe_config(tmp_path, moe_dirs[family]))
    code, _, err = run_cli("train", config)
    assert code == 0, err
    assert "lora reaches attention 100% · routed experts 100%" in err
    run = tmp_path / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert shares(manifest)["routed experts"] == 1.0 and shares(manifest)["router"] == 0.0
    assert manifest["lora"]["coverage"]["routed_experts_adapted"] is True
    # Per-expert updates in the manifest's rank statistics: in each layer and fused tensor, the experts the
    # router sent tokens to moved (an expert no token reached in 4 steps keeps B = 0, as it should).
    experts = [m for m in manifest["adapter_stats"]["modules"] if ".experts." in m["module"]]
    assert len(experts) == 2 * EXPERTS * 2  # layers x experts x (gate_up_proj, down_proj)
    for layer in (0, 1):
        for kind in ("gate_up_proj", "down_proj"):
            assert any(m["update_norm"] > 0 for m in experts if m["layer"] == layer and m["module_type"] == kind)

    code, out, err = run_cli("merge", "--adapter", run, "--out", tmp_path / "merged")
    assert code == 0, err
    merged = json.loads((tmp_path / "merged" / "merge_manifest.json").read_text())
    per_layer = 4 + EXPERTS * 3 + (3 if family == "qwen2_moe" else 0)  # attention, experts' gate/up/down, shared
    assert len(merged["adapted_tensors"]) == 2 * per_layer
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in merged["adapted_tensors"]
    assert merged["verification"]["logits"]["max_abs_diff"] <= 1e-4

    code, out, err = run_cli("inspect", run)
    assert code == 0, err
    assert "model.layers.0.mlp.experts." in out or "gate_up_proj" in out
    regression = write_jsonl(tmp_path / "regression.jsonl", copy_rows(2))
    code, out, err = run_cli("eval", "--adapter", run, "--regression", regression, "--max-regression", "100")
    assert code == 0, err


def test_run_leaving_the_experts_frozen_says_so_and_trains_no_expert(moe_dirs, write_yaml, tmp_path, run_cli):
    # Experts deliberately frozen: dropout is allowed again, attention and the shared expert train.
    config = write_yaml(moe_config(tmp_path, moe_dirs["qwen2_moe"], target_experts=False, dropout=0.05))
    code, _, err = run_cli("train", config)
    assert code == 0, err
    assert "routed experts FROZEN" in err
    run = tmp_path / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert shares(manifest)["routed experts"] == 0.0 and shares(manifest)["shared experts"] == 1.0
    assert manifest["lora"]["target_parameters"] == []
    keys = load_file(str(run / "adapter_model.safetensors"))
    assert not [k for k in keys if ".experts." in k]
    assert [k for k in keys if "shared_expert." in k]


def test_targets_peft_would_rename_on_deepseek_v3_are_an_error_not_a_silent_freeze(tmp_path, write_yaml, run_cli):
    """DeepSeek-V3's dense first layer and shared experts have gate_proj/up_proj/down_proj linears, which
    PEFT 0.21 renames to the routed experts' parameters on this family: validate says so instead."""
    from transformers import DeepseekV3Config

    model_dir = tmp_path / "deepseek"
    tokenizer = build_tokenizer()
    DeepseekV3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=2,
        first_k_dense_replace=1, n_routed_experts=EXPERTS, n_shared_experts=1, num_experts_per_tok=2, n_group=1,
        topk_group=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16,
        qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
    ).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    code, _, err = run_cli("validate", write_yaml(moe_config(tmp_path, model_dir)))
    assert code == 2
    assert "PEFT turns the linear layers named down_proj, gate_proj, up_proj of this deepseek_v3 model" in err
    assert len(err.strip().splitlines()) == 1
