"""loraft export: each engine's own rule, applied to what export wrote, computes the trained update.

The engine rules (lora_ft/serving/engines.py) are read from vLLM, SGLang, llama.cpp and Ollama sources; each
test shows the rule serving the run folder (or a plain conversion of it) wrongly, then the export right.
The last test runs real llama.cpp (llama-cpp-python) on the quickstart GGUF.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lora_ft import export as export_module
from lora_ft.serving.engines import RULES, go_uint32
from lora_ft.export import FP32_TOLERANCE, export, logits_gap, read_peft, trained_modules
from lora_ft.serving.gguf_lora import permute_rows, read_gguf, unpermute_rows, write_gguf
from lora_ft.artifacts.adapter_run import AdapterRun

REPO = Path(__file__).resolve().parents[1]


def variant(tiny_run: Path, tmp_path: Path, **changes) -> Path:
    """A copy of the trained tiny run whose adapter_config.json says something else (PEFT then trains/serves
    the same tensors under that setting, so base+adapter under PEFT stays the reference)."""
    folder = tmp_path / "run"
    shutil.copytree(tiny_run, folder, ignore=shutil.ignore_patterns("checkpoints"))
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return folder


def gap_under(rule_name: str, folder: Path, run_dir: Path) -> tuple[float, float]:
    """(max |rule's reading of folder - PEFT base+adapter|, the adapter's own effect) in fp32."""
    run = AdapterRun.load(run_dir)
    spec, source, _ = run.resolve_base(None)
    gap, effect, _, _ = logits_gap(run, spec, source, read_peft(RULES[rule_name], folder))
    return gap, effect


def base_view(run_dir: Path):
    from lora_ft.model.loading import load_model_config

    run = AdapterRun.load(run_dir)
    spec, source, _ = run.resolve_base(None)
    return run, spec, source, load_model_config(spec, source)


# --------------------------------------------------------------------------------------------- scaling rules


def test_rslora_adapter_is_served_sqrt_r_too_weak_by_sglang_until_export_folds_the_scale(tiny_run, tmp_path):
    run = variant(tiny_run, tmp_path, use_rslora=True)  # r 4, alpha 8: trained scale 8/2 = 4, SGLang's 8/4 = 2
    before, effect = gap_under("sglang", run, run)
    assert effect > 0.1 and before > 0.1 * effect

    out = export(run, "sglang", tmp_path / "sglang")
    after, _ = gap_under("sglang", out.out_dir, run)
    assert after < FP32_TOLERANCE
    config = json.loads((out.out_dir / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 16 and config["use_rslora"] is False  # 4 * r: exact, so nothing folded
    assert out.manifest.folded_modules == 0
    assert any("use_rslora" in c for c in out.manifest.conversions)


def test_vllm_drops_alpha_pattern_until_export_folds_it_into_lora_b(tiny_run, tmp_path):
    run = variant(tiny_run, tmp_path, alpha_pattern={"q_proj": 32})  # q_proj scale 8, the rest 2
    before, effect = gap_under("vllm", run, run)
    assert before > 0.1 * effect

    out = export(run, "vllm", tmp_path / "vllm")
    assert gap_under("vllm", out.out_dir, run)[0] < FP32_TOLERANCE
    assert out.manifest.folded_modules == 2  # the two layers' q_proj
    config = json.loads((out.out_dir / "adapter_config.json").read_text())
    assert config["alpha_pattern"] == {} and config["lora_alpha"] == 8


def test_float_alpha_fails_ollamas_unsigned_integer_parse_and_the_export_writes_an_integer(tiny_run, tmp_path):
    def alpha_literal(folder: Path) -> str:
        text = (folder / "adapter_config.json").read_text()
        return text.split('"lora_alpha":', 1)[1].split(",", 1)[0].strip()

    assert alpha_literal(tiny_run) == "8.0"  # what PEFT writes for loraft's float alpha
    with pytest.raises(ValueError, match="cannot unmarshal number 8.0"):
        go_uint32(alpha_literal(tiny_run))
    out = export(tiny_run, "vllm", tmp_path / "vllm")
    assert go_uint32(alpha_literal(out.out_dir)) == 8


def test_a_non_integer_alpha_is_folded_into_lora_b_under_an_integer_alpha(tiny_run, tmp_path):
    run = variant(tiny_run, tmp_path, lora_alpha=6.5)
    out = export(run, "sglang", tmp_path / "sglang")
    config = json.loads((out.out_dir / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 4  # = r: the engine scale is 1, the trained 6.5/4 sits in B
    assert out.manifest.folded_modules == 14
    assert gap_under("sglang", out.out_dir, run)[0] < FP32_TOLERANCE


# --------------------------------------------------------------------------------------------- llama.cpp layout


def test_llamacpp_gguf_carries_the_adapter_keys_names_and_shapes_llama_cpp_checks(tiny_run, tmp_path):
    import gguf

    out = export(tiny_run, "llamacpp", tmp_path / "gguf")
    reader = gguf.GGUFReader(str(out.out_dir / "adapter.gguf"))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["adapter.lora.alpha"].contents() == 8.0
    tensors = {t.name: [int(x) for x in t.shape] for t in reader.tensors}
    assert len(tensors) == 2 * 14
    # ne order: lora_a [in, r], lora_b [r, out]; k_proj is 32 -> 16 (2 KV heads of 8)
    assert tensors["blk.0.attn_q.weight.lora_a"] == [32, 4] and tensors["blk.0.attn_q.weight.lora_b"] == [4, 32]
    assert tensors["blk.1.attn_k.weight.lora_b"] == [4, 16] and tensors["blk.1.ffn_down.weight.lora_a"] == [64, 4]
    assert sorted(p.name for p in out.out_dir.iterdir()) == ["adapter.gguf", "export_manifest.json"]


def test_qk_rows_of_b_are_permuted_as_convert_hf_to_gguf_permutes_the_base_weight():
    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 32, generator=gen), torch.randn(16, 4, generator=gen)
    # the base's permuted weight plus the permuted adapter = the permuted sum
    assert torch.equal(permute_rows(B, 2) @ A, permute_rows(B @ A, 2))
    assert torch.equal(unpermute_rows(permute_rows(B, 2), 2), B)
    assert not torch.equal(permute_rows(B, 2), B)


def test_unpermuted_qk_rows_or_an_unfolded_rslora_scale_fail_llamacpps_reading(tiny_run, tmp_path):
    rslora = variant(tiny_run, tmp_path, use_rslora=True)
    run, spec, source, model_config = base_view(rslora)
    modules = trained_modules(run)
    naive = [m.with_b(m.B, 0.0) for m in modules]
    # convert_lora_to_gguf.py: alpha as given, rsLoRA ignored
    write_gguf(tmp_path / "naive.gguf", naive, 8.0, "llama", (4, 2))
    assert logits_gap(run, spec, source, read_gguf(tmp_path / "naive.gguf", model_config, source))[0] > 0.01
    # B rows left in HF's order
    folded, alpha, *_ = export_module.normalise(RULES["llamacpp"], run.adapter, modules)
    write_gguf(tmp_path / "unpermuted.gguf", folded, alpha, "llama", None)
    assert logits_gap(run, spec, source, read_gguf(tmp_path / "unpermuted.gguf", model_config, source))[0] > 0.01

    out = export(rslora, "llamacpp", tmp_path / "gguf")
    assert out.manifest.verification.max_abs_diff < FP32_TOLERANCE


def test_ollama_export_is_the_adapter_gguf_and_a_modelfile_from_the_base(tiny_run, tmp_path):
    out = export(tiny_run, "ollama", tmp_path / "ollama")
    lines = (out.out_dir / "Modelfile").read_text().splitlines()
    assert lines[:2] == [f"FROM {AdapterRun.load(tiny_run).resolve_base(None)[1].display}", "ADAPTER ./adapter.gguf"]
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert sorted(p.name for p in out.out_dir.iterdir()) == ["Modelfile", "adapter.gguf", "export_manifest.json"]


# --------------------------------------------------------------------------------------------- what is written


def test_vllm_export_is_a_peft_folder_with_the_exact_serve_command_and_a_manifest(tiny_run, tmp_path, run_cli):
    out = tmp_path / "vllm"
    code, stdout, _ = run_cli("export", tiny_run, "--to", "vllm", "--out", out)
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "export_manifest.json",
                     "generation_config.json", "serve.sh", "tokenizer.json", "tokenizer_config.json"]
    manifest = json.loads((out / "export_manifest.json").read_text())
    base = str(AdapterRun.load(tiny_run).resolve_base(None)[1].path)
    command = f"vllm serve {base} --enable-lora --lora-modules run={out.resolve()} --max-lora-rank 8"  # r 4 -> 8
    assert manifest["command"] == command and command in stdout
    assert (out / "serve.sh").read_text().splitlines()[-1] == command
    assert manifest["schema_version"] == 1 and manifest["target"] == "vllm"
    assert manifest["rule"]["source"].startswith("vllm/lora/peft_helper.py")
    assert manifest["verification"]["max_abs_diff"] < FP32_TOLERANCE < manifest["verification"]["adapter_effect"]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == base


def test_transformers_and_merged_exports_load_as_peft_and_as_a_plain_model(tiny_run, tmp_path):
    peft = export(tiny_run, "transformers", tmp_path / "peft")
    assert peft.manifest.verification.max_abs_diff == 0.0
    merged = export(tiny_run, "merged", tmp_path / "merged")
    assert (merged.out_dir / "merge_manifest.json").is_file() and (merged.out_dir / "export_manifest.json").is_file()
    assert merged.manifest.verification.max_abs_diff < FP32_TOLERANCE
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert f"model           {merged.out_dir.resolve()} (base " in merged.summary()  # the folder is the model, not a base
    assert "\nbase " not in merged.summary()


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "case, message",
    [
        ("unfinished", "not a finished loraft run"),
        ("unknown_target", "'tgi' is not a target"),
        ("dora", "vllm cannot load DoRA"),
        ("modules_to_save", "vllm cannot load fully trained modules"),
        ("existing_out", "already exists"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, message, tiny_run, tmp_path, run_cli):
    run, target, out = tiny_run, "vllm", tmp_path / "out"
    if case == "unfinished":
        run = variant(tiny_run, tmp_path)
        (run / "manifest.json").unlink()
    if case == "unknown_target":
        target = "tgi"
    if case in ("dora", "modules_to_save"):
        run = variant(tiny_run, tmp_path, **({"use_dora": True} if case == "dora" else {"modules_to_save": ["lm_head"]}))
    if case == "existing_out":
        out.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, stderr = run_cli("export", run, "--to", target, "--out", out)
    assert code == 2
    assert stderr.count("\n") == 1 and stderr.startswith("error:") and message in stderr
    if case in ("dora", "modules_to_save"):
        assert "--to merged" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_trainable_token_rows_are_refused_for_vllm_naming_the_path_that_carries_them(tiny_run, tmp_path, run_cli):
    from lora_ft.serving.engines import merge_takes_trainable_tokens

    run = variant(tiny_run, tmp_path, trainable_token_indices=[5, 6])
    code, _, stderr = run_cli("export", run, "--to", "vllm", "--out", tmp_path / "out")
    assert code == 2 and "vllm cannot load trainable-token rows" in stderr
    assert ("--to merged" if merge_takes_trainable_tokens() else "--to transformers") in stderr
    assert not (tmp_path / "out").exists()


def test_a_verification_mismatch_exits_1_and_leaves_nothing(tiny_run, tmp_path, run_cli, monkeypatch):
    real = export_module.normalise

    def off_by_a_tenth(*args):
        modules, *rest = real(*args)
        return [m.with_b(m.B * 1.1, m.scale) for m in modules], *rest

    monkeypatch.setattr(export_module, "normalise", off_by_a_tenth)
    code, _, stderr = run_cli("export", tiny_run, "--to", "sglang", "--out", tmp_path / "out")
    assert code == 1 and "differs from base+adapter" in stderr
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------- before training


def test_validate_notes_what_export_will_convert_for_each_deployment_target(tiny_config, write_yaml, run_cli):
    tiny_config["lora"]["use_rslora"] = True
    tiny_config["serving"] = {"deployment": ["vllm", "sglang", "llamacpp"]}
    code, stdout, _ = run_cli("validate", write_yaml(tiny_config))
    assert code == 0
    notes = [line for line in stdout.splitlines() if line.startswith("deploy")]
    assert any("sglang ignores use_rslora" in n and "export folds" in n for n in notes)
    assert any("llamacpp: the base is not a GGUF file" in n for n in notes)
    assert not any("vllm" in n for n in notes)  # vLLM honours use_rslora


@pytest.mark.parametrize("command", ["validate", "train"])
def test_an_option_the_target_refuses_fails_before_training_with_the_fix(command, tiny_config, write_yaml, run_cli, tmp_path):
    tiny_config["lora"]["use_dora"] = True
    tiny_config["serving"] = {"deployment": "vllm"}
    code, _, stderr = run_cli(command, write_yaml(tiny_config))
    assert code == 2
    assert stderr.strip() == ("error: serving.deployment: vllm cannot load DoRA (use_dora); train without it, or deploy "
                              "the merged model (serving.deployment: merged; loraft export --to merged)")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------- real llama.cpp


QUICKSTART_ROWS = 10
# What export must preserve, teacher-forced over the same tokens (held-out prompt + reference answer), in
# log-probabilities. llama.cpp runs the Q4_1 base through Q4_1 x Q8 kernels that differ by build and CPU,
# transformers the dequantized weights in fp32, so the base alone already differs between them ("noise").
# The adapter's effect (base+adapter minus base) is compared engine to engine: the quantized activations
# perturb it by about the noise's share of a logit, while an export mistake (scale, rsLoRA, Q/K order, a module
# left out) moves it by tens of percent. Greedy text is not compared: a near-tie flips by build.
EFFECT_TOLERANCE = 0.2  # llama.cpp's adapter effect within 20% (RMS) of PEFT's; a half-scale adapter is ~50% off
TEETH = 4.0  # the adapter's effect must stand this far above the base's noise for the comparison to mean anything


def teacher_forced_logprobs(forward, sequences: list[tuple[list[int], int]]) -> list[torch.Tensor]:
    """Log-probabilities [answer tokens, vocab] that predict each answer token, per (ids, prompt length)."""
    out = []
    for ids, start in sequences:
        logits = torch.as_tensor(forward(ids), dtype=torch.float32)
        out.append(torch.log_softmax(logits[start - 1:len(ids) - 1], dim=-1))
    return out


def rms_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Mean over answer positions of the RMS (over the vocabulary) difference of two log-probability sets."""
    per_position = torch.cat([(x - y).pow(2).mean(-1).sqrt() for x, y in zip(a, b)])
    return float(per_position.mean())


@pytest.mark.slow
def test_llama_cpp_with_the_exported_gguf_computes_the_adapter_peft_computes(tmp_path, quickstart_gguf, run_cli):
    """SmolLM2-135M (Q4_1 GGUF) + the exported adapter in real llama.cpp vs transformers + PEFT on the same run:
    the adapter changes llama.cpp's next-token log-probabilities as it changes PEFT's (within 20%), far above the
    quantization noise between the two engines' bases; llama.cpp serving the adapter at half strength fails it."""
    llama_cpp = pytest.importorskip("llama_cpp")  # installed by .ci/run and the README's set-up
    from peft import PeftModel
    from transformers import AutoTokenizer

    from conftest import write_jsonl
    from lora_ft.config_io import load_config
    from lora_ft.data.conversation import Conversation
    from lora_ft.model.loading import load_base_model
    from lora_ft.train import train

    rows = [json.loads(line) for line in (REPO / "recipes/data/quickstart_train.jsonl").read_text().splitlines()[:32]]
    held_out = [json.loads(line) for line in (REPO / "recipes/data/quickstart_eval.jsonl").read_text().splitlines()]
    cfg = load_config(REPO / "recipes/quickstart.yaml", [
        f"data.train={write_jsonl(tmp_path / 'train.jsonl', rows)}", "data.eval=null", "training.max_steps=6",
        "training.learning_rate=3e-3", "training.warmup_ratio=0", "training.max_seq_length=128", "training.logging_steps=2",
        "lora.rank=8", "lora.alpha=16", "lora.use_rslora=true",  # rsLoRA: llama.cpp would serve it 1/sqrt(8) too weak
        "serving.deployment=llamacpp", f"output_dir={tmp_path / 'run'}",
    ])
    run = train(cfg).run_dir
    out = tmp_path / "gguf"
    assert run_cli("export", run, "--to", "llamacpp", "--out", out)[0] == 0

    tokenizer = AutoTokenizer.from_pretrained(run)
    conversation = Conversation.read(run, tokenizer)
    sequences = []
    for row in held_out[:QUICKSTART_ROWS]:
        prompt = conversation.prompt_ids([{"role": "user", "content": row["prompt"]}])  # as loraft generate renders it
        answer = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        sequences.append((prompt + answer, len(prompt)))

    base = load_base_model(cfg.model.model_copy(update={"dtype": "float32", "quantization": None}),
                           _source(cfg.model), "fp32")
    peft = PeftModel.from_pretrained(base, str(run)).eval()
    with torch.no_grad():
        peft_run = teacher_forced_logprobs(lambda ids: peft(input_ids=torch.tensor([ids])).logits[0], sequences)
        with peft.disable_adapter():
            peft_base = teacher_forced_logprobs(lambda ids: peft(input_ids=torch.tensor([ids])).logits[0], sequences)

    def llama(**adapter):
        llm = llama_cpp.Llama(model_path=str(quickstart_gguf), n_ctx=512, n_threads=2, seed=0, logits_all=True,
                              verbose=False, **adapter)

        def forward(ids):
            llm.reset()
            llm.eval(ids)
            return llm.scores[:len(ids)].copy()

        return teacher_forced_logprobs(forward, sequences)

    cpp_base = llama()
    cpp_run = llama(lora_path=str(out / "adapter.gguf"))
    cpp_half = llama(lora_path=str(out / "adapter.gguf"), lora_scale=0.5)

    def effect(with_adapter, without):
        return [a - b for a, b in zip(with_adapter, without)]

    zeros = [torch.zeros_like(x) for x in peft_run]
    noise = rms_gap(cpp_base, peft_base)  # the two engines on the base alone
    size = rms_gap(effect(peft_run, peft_base), zeros)  # what the adapter does, per PEFT
    error = rms_gap(effect(cpp_run, cpp_base), effect(peft_run, peft_base))  # the export's error
    half_error = rms_gap(effect(cpp_half, cpp_base), effect(peft_run, peft_base))
    print(f"base noise {noise:.4f}, adapter effect {size:.4f}, llama.cpp vs PEFT effect {error:.4f} "
          f"({error / size:.1%}), at half scale {half_error:.4f} ({half_error / size:.1%})")
    assert size > TEETH * noise, "the adapter must change the base well beyond the engines' noise"
    assert error < EFFECT_TOLERANCE * size
    assert half_error > EFFECT_TOLERANCE * size, "an adapter served at half strength must fail this comparison"


def _source(spec):
    from lora_ft.model.loading import resolve_model_source

    return resolve_model_source(spec)
