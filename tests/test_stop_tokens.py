"""Stop tokens the base never trained: flagged before training, their rows trained with the adapter, checked after.

Two tiny bases are built here with the two kinds of untrained rows seen in real checkpoints: the stop and header
rows at zero in both embedding matrices (Llama 3 base's <|eot_id|>, <|start_header_id|>), and a stop row that is
the same vector as other never-used rows in a tied embedding (stories260K's </s> = <unk> = its byte rows).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny_llama, build_tokenizer, copy_rows, tiny_run_config, write_jsonl
from lora_ft.config_io import validate_dict
from lora_ft.model.stop_tokens import STOP_WARN_SHARE

EOT, HEADER = "<|im_end|>", "<|im_start|>"  # the tiny ChatML tokenizer's EOS / end of turn, and its turn header
NEVER_USED = ("<pad>", "<s>", "</s>")  # rows no training row selects


def save_base(path: Path, kind: str) -> Path:
    """kind 'zero': EOT and HEADER rows all zero in the (untied) input and output matrices.
    kind 'collapsed': a tied embedding whose EOT row is exactly the vector of the NEVER_USED rows."""
    tokenizer = build_tokenizer()
    model = build_tiny_llama(tokenizer, tie=kind == "collapsed")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (EOT, HEADER, *NEVER_USED)}
    with torch.no_grad():
        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        if kind == "zero":
            for token in (EOT, HEADER):
                embed[ids[token]] = 0
                head[ids[token]] = 0
        else:
            vector = embed[ids["<s>"]].clone()  # not <pad>'s: transformers zeroes the padding row at init
            for token in (EOT, *NEVER_USED):
                embed[ids[token]] = vector
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return Path(path)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stop_bases")
    return {kind: save_base(root / kind, kind) for kind in ("zero", "collapsed")}


def config(base: Path, root: Path, **lora) -> dict:
    return tiny_run_config(root, base, lora=lora, training={"gradient_checkpointing": False})


@pytest.fixture(scope="module")
def runs(bases, tmp_path_factory) -> dict[str, Path]:
    """Finished runs, trained once: collapsed base with train_tokens auto and off, zero base with auto."""
    from lora_ft.train import train

    root = tmp_path_factory.mktemp("stop_runs")
    out = {}
    for name, kind, mode in (("collapsed-auto", "collapsed", "auto"), ("collapsed-off", "collapsed", "off"), ("zero-auto", "zero", "auto")):
        out[name] = train(validate_dict(config(bases[kind], root / name, train_tokens=mode))).run_dir
    return out


def ids_of(base: Path, *tokens: str) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


# ---------------------------------------------------------------------------------------------
# Before training


def test_zero_rows_of_stop_and_header_tokens_are_flagged_in_both_matrices(bases, tmp_path):
    from lora_ft.train import preflight

    check = preflight(validate_dict(config(bases["zero"], tmp_path))).stop_tokens
    flagged = {t.token: {r.matrix: r.verdict for r in t.flagged_rows} for t in check.flagged}
    assert flagged == {EOT: {"input": "near-zero", "output": "near-zero"}, HEADER: {"input": "near-zero", "output": "near-zero"}}
    assert check.tokens[0].roles == ("EOS", "end of turn")


def test_stop_row_collapsed_onto_never_used_rows_is_flagged_with_its_twins(bases, tmp_path):
    from lora_ft.train import preflight

    check = preflight(validate_dict(config(bases["collapsed"], tmp_path))).stop_tokens
    assert [t.token for t in check.flagged] == [EOT]
    (row,) = check.flagged[0].flagged_rows
    assert (row.matrix, row.verdict, row.twins, row.twin_examples) == ("tied", "collapsed", 3, NEVER_USED)
    assert 0.5 < row.relative_norm < 2  # not small: only its twins give it away


def test_a_base_with_trained_rows_flags_nothing(tiny_model_dir, tmp_path):
    from lora_ft.train import preflight

    check = preflight(validate_dict(config(tiny_model_dir, tmp_path)))
    assert check.stop_tokens.flagged == () and check.token_training.peft_indices is None
    assert {t.token for t in check.stop_tokens.tokens} == {EOT, HEADER}


def test_validate_names_the_token_and_why_and_what_train_tokens_does(bases, tmp_path, write_yaml, run_cli):
    code, stdout, _ = run_cli("validate", write_yaml(config(bases["collapsed"], tmp_path)))
    assert code == 0
    assert (f"stop tokens: {EOT} (EOS, end of turn, id 4): never trained: its embedding row (tied to the output layer) "
            "is the same vector as 3 other rows") in stdout
    assert "its rows train with the adapter (lora.train_tokens: auto)" in stdout
    code, stdout, _ = run_cli("validate", write_yaml(config(bases["zero"], tmp_path, train_tokens="off")))
    assert code == 0 and f"{HEADER} (turn marker, id 3): never trained: its input embedding row is near zero" in stdout
    assert "NOT trained (lora.train_tokens: off): the model may never learn to stop; set lora.train_tokens: auto" in stdout


def test_trainable_count_includes_exactly_the_flagged_rows(bases, tmp_path):
    from lora_ft.train import preflight

    auto = preflight(validate_dict(config(bases["zero"], tmp_path)))
    off = preflight(validate_dict(config(bases["zero"], tmp_path, train_tokens="off")))
    hidden = auto.model_config.hidden_size
    assert auto.token_training.peft_indices == {"model.embed_tokens": [3, 4], "lm_head": [3, 4]}
    assert auto.trainable - off.trainable == 2 * 2 * hidden  # two rows in each of two untied matrices


def test_a_train_tokens_entry_that_is_not_one_token_fails_before_weights_load(bases, tmp_path, write_yaml, run_cli):
    code, _, stderr = run_cli("validate", write_yaml(config(bases["zero"], tmp_path, train_tokens=["<|nope|>"])))
    assert code == 2
    assert stderr.startswith("error: lora.train_tokens: '<|nope|>' is not one token of this tokenizer")
    code, _, stderr = run_cli("validate", write_yaml(config(bases["zero"], tmp_path, train_tokens="sometimes")))
    assert code == 2 and "lora.train_tokens" in stderr and "auto, off, nor a list of tokens" in stderr


# ---------------------------------------------------------------------------------------------
# Training: only the flagged rows train, and the model learns to stop


def test_auto_saves_only_the_flagged_rows_with_the_adapter(runs, bases):
    adapter = json.loads((runs["zero-auto"] / "adapter_config.json").read_text())
    assert adapter["trainable_token_indices"] == {"model.embed_tokens": [3, 4], "lm_head": [3, 4]}
    tensors = load_file(runs["zero-auto"] / "adapter_model.safetensors")
    rows = {k: v for k, v in tensors.items() if "token_adapter" in k}
    assert sorted(rows) == ["base_model.model.lm_head.token_adapter.trainable_tokens_delta",
                            "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert all(v.shape == (2, 32) and float(v.abs().min()) > 0 for v in rows.values())  # moved off zero, every element
    manifest = json.loads((runs["zero-auto"] / "manifest.json").read_text())["stop_tokens"]
    assert manifest["check"]["untrained"] == [EOT, HEADER]
    assert manifest["train_tokens"]["rows"] == {"model.embed_tokens": [3, 4], "lm_head": [3, 4]}


def test_collapsed_stop_row_trains_and_the_adapter_stops_where_answers_end(runs):
    stop = json.loads((runs["collapsed-auto"] / "manifest.json").read_text())["stop_tokens"]["after_training"]
    # The base cannot prefer EOT over its 3 identical twins: at most 1/4 of the mass, and never the top token
    # (torch.argmax picks the first of equal values, <pad>).
    assert stop["base"]["mean_probability"] <= 0.25 + 1e-6 and stop["base"]["top1_share"] == 0.0
    assert stop["adapter"]["top1_share"] == 1.0 and stop["adapter"]["mean_probability"] > 0.5
    assert stop["warning"] is None and stop["adapter"]["answers"] == 8


def test_train_tokens_off_is_flagged_after_training_with_cause_and_fix(runs):
    stop = json.loads((runs["collapsed-off"] / "manifest.json").read_text())["stop_tokens"]["after_training"]
    assert stop["adapter"]["mean_probability"] <= 0.25 + 1e-6  # LoRA alone cannot separate EOT from its twins
    assert stop["adapter"]["top1_share"] < STOP_WARN_SHARE
    assert f"Cause: {EOT} (EOS, end of turn, id 4): never trained" in stop["warning"]
    assert stop["warning"].endswith("Fix: set lora.train_tokens: auto")


# ---------------------------------------------------------------------------------------------
# After training: eval, generate, inspect and merge read the trained rows


def test_eval_reports_stop_probability_and_greedy_stops_for_base_and_adapter(runs):
    from lora_ft.evaluate import EvalSettings, evaluate

    metrics = evaluate(runs["collapsed-auto"], regression=[], settings=EvalSettings(max_new_tokens=8), progress=False).task["metrics"]
    assert metrics["stop_is_top1"]["base"] == 0.0 and metrics["stop_is_top1"]["adapter"] == 1.0
    assert metrics["stop_probability"]["base"] <= 0.25 + 1e-6
    assert metrics["stops"]["base"] == 0.0 and metrics["stops"]["adapter"] == 1.0


def test_inspect_lists_each_trained_row_and_how_far_it_moved(runs, bases):
    from lora_ft.rank_diagnostics import inspect_adapter

    rows = inspect_adapter(runs["zero-auto"]).to_json()["trained_tokens"]
    assert [(r["token"], r["module"]) for r in rows] == [
        (HEADER, "lm_head"), (EOT, "lm_head"), (HEADER, "model.embed_tokens"), (EOT, "model.embed_tokens")]
    assert all(r["norm_before"] == 0.0 and r["change"] == pytest.approx(r["norm_after"]) and r["norm_after"] > 0 for r in rows)


def test_merge_writes_the_trained_rows_and_passes_its_logits_check(runs, bases, tmp_path, run_cli):
    out = tmp_path / "merged"
    code, _, _ = run_cli("merge", "--adapter", runs["zero-auto"], "--out", out)
    assert code == 0
    manifest = json.loads((out / "merge_manifest.json").read_text())
    assert manifest["token_rows"] == {"lm_head.weight": [3, 4], "model.embed_tokens.weight": [3, 4]}
    assert manifest["verification"]["logits"]["max_abs_diff"] <= 1e-4
    merged = load_file(out / "model-00001-of-00001.safetensors")
    trained = load_file(runs["zero-auto"] / "adapter_model.safetensors")
    base = load_file(bases["zero"] / "model.safetensors")
    for name, key in (("model.embed_tokens.weight", "base_model.model.model.embed_tokens"), ("lm_head.weight", "base_model.model.lm_head")):
        assert torch.equal(merged[name][[3, 4]], trained[f"{key}.token_adapter.trainable_tokens_delta"])
        keep = [i for i in range(merged[name].shape[0]) if i not in (3, 4)]
        assert torch.equal(merged[name][keep], base[name][keep])


def test_merge_of_a_tied_base_keeps_it_tied_and_matches_peft(runs, tmp_path, run_cli):
    out = tmp_path / "merged"
    code, _, _ = run_cli("merge", "--adapter", runs["collapsed-auto"], "--out", out)
    assert code == 0
    manifest = json.loads((out / "merge_manifest.json").read_text())
    assert manifest["token_rows"] == {"model.embed_tokens.weight": [4]} and manifest["untied_embeddings"] is False
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert manifest["verification"]["logits"]["max_abs_diff"] <= 1e-4


def test_generate_with_trained_rows_stops_and_the_base_runs_to_the_limit(runs, tmp_path):
    from lora_ft.serving.inference import BASE, GenerationSettings, load_for_inference
    from lora_ft.generate import generate_file

    run = runs["collapsed-auto"]
    inference = load_for_inference(run)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in copy_rows(4, 5)])
    result = generate_file(inference, prompts, GenerationSettings(max_new_tokens=8), labels=[BASE, inference.labels[0]], progress=False)
    assert [r["outputs"][inference.labels[0]]["stopped"] for r in result.rows] == [True] * 4
    assert [r["outputs"][BASE]["stopped"] for r in result.rows] == [False] * 4


def test_a_train_tokens_list_trains_those_rows_in_every_embedding_matrix(tiny_model_dir, tmp_path):
    from lora_ft.train import preflight

    check = preflight(validate_dict(config(tiny_model_dir, tmp_path, train_tokens=[EOT])))
    assert check.token_training.peft_indices == {"model.embed_tokens": [4], "lm_head": [4]}


def test_gguf_rows_are_read_one_by_one_and_dequantized_as_the_whole_tensor_would_be(tmp_path):
    """A .gguf base is checked from its file too: float rows as stored, quantized rows dequantized per row."""
    import gguf
    import numpy as np

    from lora_ft.model.embedding_rows import RowReader
    from lora_ft.model.loading import ModelSource

    table = np.random.default_rng(0).standard_normal((40, 64)).astype(np.float32)
    quantized = gguf.quants.quantize(table, gguf.GGMLQuantizationType.Q8_0)
    writer = gguf.GGUFWriter(str(tmp_path / "base.gguf"), "llama")
    writer.add_tensor("token_embd.weight", table)
    writer.add_tensor("output.weight", quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        step()
    reader = RowReader(ModelSource(tmp_path, "base.gguf", "base.gguf", None))
    rows = [0, 7, 39]
    assert reader.n_rows("model.embed_tokens", "input") == 40
    assert np.array_equal(reader.rows("model.embed_tokens", "input", rows).numpy(), table[rows])
    whole = gguf.quants.dequantize(quantized, gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(reader.rows("lm_head", "output", rows).numpy(), whole[rows])
