"""The pre-flight: one pass that validate prints and train runs; cheap refusals first; one memory model with the
checkpointing planner; serving.merge_adapter honoured; each data row read and encoded once per command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import copy_rows, write_jsonl
from lora_ft.config_io import validate_dict
from test_stop_tokens import bases, config  # noqa: F401  (bases: a fixture; a base whose EOS row never trained)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# serving.merge_adapter


def test_merge_adapter_checks_an_engine_as_serving_the_merged_model_and_says_what_the_adapter_alone_lacks(
    bases, tmp_path, write_yaml, run_cli  # noqa: F811
):
    cfg = config(bases["collapsed"], tmp_path)  # its EOS row never trained: train_tokens auto trains that row
    cfg["serving"] = {"deployment": "vllm"}
    code, _, err = run_cli("validate", write_yaml(cfg))
    assert code == 2 and "vllm cannot load trainable-token rows" in err  # the adapter alone: refused, with the fix

    cfg["serving"] = {"deployment": "vllm", "merge_adapter": True}
    code, out, err = run_cli("validate", write_yaml(cfg))
    assert code == 0, err
    assert ("deploy      note: vllm serves the merged model (serving.merge_adapter: true; loraft merge); the adapter "
            "alone would not stop on vllm: vllm cannot load trainable-token rows") in out


def test_the_train_summary_carries_the_merge_adapter_note(bases, tmp_path):  # noqa: F811
    from lora_ft.train import TrainResult, preflight

    cfg = config(bases["collapsed"], tmp_path)
    cfg["serving"] = {"deployment": "vllm", "merge_adapter": True}
    check = preflight(validate_dict(cfg))
    summary = TrainResult(tmp_path / "run", None, notes=check.deployment_notes).summary()
    assert "deploy          vllm serves the merged model" in summary and "the adapter alone would not stop on vllm" in summary


# ---------------------------------------------------------------------------------------------
# Cheap checks first


def _cli_in_a_fresh_process(args: list[str]) -> dict:
    """Run the CLI in a new interpreter; report exit code, stderr and whether torch/transformers were imported."""
    script = textwrap.dedent(f"""
        import json, sys, time
        from typer.testing import CliRunner
        from lora_ft.cli import app
        started = time.process_time()
        result = CliRunner().invoke(app, {args!r})
        print(json.dumps({{"code": result.exit_code, "err": result.stderr, "cpu": time.process_time() - started,
                          "heavy": sorted(m for m in ("torch", "transformers", "trl", "peft") if m in sys.modules)}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_rerun_of_a_finished_run_and_a_config_typo_are_refused_before_torch_is_imported(tiny_config, write_yaml, tmp_path):
    finished = Path(tiny_config["output_dir"])
    finished.mkdir(parents=True)
    (finished / "manifest.json").write_text("{}")
    result = _cli_in_a_fresh_process(["train", str(write_yaml(tiny_config))])
    assert result["code"] == 2 and "holds a finished run" in result["err"]
    assert result["heavy"] == [] and result["cpu"] < 5  # was ~20 CPU-seconds (100 s on a busy machine)

    tiny_config["training"]["learnin_rate"] = 0.1
    result = _cli_in_a_fresh_process(["train", str(write_yaml(tiny_config, "typo.yaml"))])
    assert result["code"] == 2 and "did you mean 'learning_rate'" in result["err"]
    assert result["heavy"] == []


# ---------------------------------------------------------------------------------------------
# One memory model


def test_validate_estimates_memory_with_the_checkpointing_planners_own_model():
    from transformers import LlamaConfig

    from lora_ft.model.memory import estimate_memory, fewest_layers_to_checkpoint
    from lora_ft.model.speed import _layers_to_checkpoint

    llama8b = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, vocab_size=128256)
    cfg = validate_dict({"model": {"name": "x", "quantization": {"bits": 4}},
                         "training": {"batch_size": 4, "max_seq_length": 2048, "memory_budget_gib": 0.9 * 24}})
    planned = _layers_to_checkpoint(cfg, llama8b, 32, weights_gib=5.5, trainable=42_000_000)
    assert planned == fewest_layers_to_checkpoint(cfg, llama8b, 32, budget=0.9 * 24, weights=5.5, trainable=42_000_000)
    fits = estimate_memory(cfg, llama8b, weights=5.5, trainable=42_000_000, checkpoint_layers=planned)
    one_fewer = estimate_memory(cfg, llama8b, weights=5.5, trainable=42_000_000, checkpoint_layers=planned - 1)
    assert fits.total <= 0.9 * 24 < one_fewer.total  # the plan is the estimate's own fewest-layers answer
    everything = estimate_memory(cfg, llama8b, weights=5.5, trainable=42_000_000, checkpoint_layers=32)
    assert everything.activations < fits.activations  # `auto` is not counted as every layer recomputed


def test_preflight_estimate_follows_the_plan_for_each_checkpointing_setting(tiny_config):
    from lora_ft.train import preflight

    for setting, recomputed in (("auto", 0), (True, 2), (False, 0)):  # on a CPU, auto recomputes nothing
        tiny_config["training"]["gradient_checkpointing"] = setting
        check = preflight(validate_dict(tiny_config))
        assert check.memory.checkpoint_layers == check.speed.checkpoint_layers == recomputed
        assert f"{recomputed}/2 layers recomputed" in check.summary()


# ---------------------------------------------------------------------------------------------
# Prepared data once


def test_one_train_reads_each_data_file_once_and_encodes_each_row_once(tiny_config, monkeypatch):
    import lora_ft.data.conversation as conversation
    import lora_ft.data.rows as rows
    from lora_ft.train import train

    counts = {"reads": 0, "hashes": 0, "encodings": 0}

    def counted(name, original):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(rows, "read_source", counted("reads", rows.read_source))
    monkeypatch.setattr(rows, "file_sha256", counted("hashes", rows.file_sha256))  # where describe_sources looks it up
    monkeypatch.setattr(conversation, "encode", counted("encodings", conversation.encode))  # every row encoding goes through it
    tiny_config["training"]["max_steps"] = 2
    result = train(validate_dict(tiny_config))
    assert counts == {"reads": 2, "hashes": 0, "encodings": 32 + 8}  # before: 3 reads and a hash per file, 2.8 encodings a row
    sources = json.loads((result.run_dir / "manifest.json").read_text())["data"]["sources"]
    assert [len(s["sha256"]) for s in sources] == [64, 64]


def test_data_show_encodes_only_the_rows_it_shows(tiny_config, monkeypatch):
    import lora_ft.data.conversation as conversation
    from lora_ft.data_show import show_rows
    from lora_ft.model.loading import load_tokenizer, resolve_model_source

    cfg = validate_dict(tiny_config)
    encoded = []
    monkeypatch.setattr(conversation, "encode", lambda example, *a, _e=conversation.encode, **k: encoded.append(example) or _e(example, *a, **k))
    shown = show_rows(cfg, load_tokenizer(cfg.model, resolve_model_source(cfg.model)), rows=2)
    assert len(shown) == 2 == len(encoded)


def test_a_bad_row_is_reported_the_same_by_validate_and_data_check(tiny_config, write_yaml, run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")  # narrower than the path: the file:line must not be wrapped in two
    bad = write_jsonl(tmp_path / "bad.jsonl", copy_rows(4) + [{"prompt": 3, "completion": "x"}])
    tiny_config["data"]["train"] = str(bad)
    code, _, validate_err = run_cli("validate", write_yaml(tiny_config))
    assert code == 2 and "bad.jsonl:5: field 'prompt' must be a string" in validate_err
    code, out, _ = run_cli("data", "check", write_yaml(tiny_config))
    assert code == 2 and f"{bad}:5  error=field 'prompt' must be a string" in out
