"""loraft train: a run on a tiny model learns, writes a loadable adapter, and records what it did."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lora_ft.config_io import validate_dict
from lora_ft.errors import LoraftError
from lora_ft.train import train


@pytest.fixture
def finished_run(tiny_config):
    cfg = validate_dict(tiny_config)
    return cfg, train(cfg)


def test_loss_falls_and_adapter_beats_base_on_heldout(finished_run):
    _, result = finished_run
    history = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < losses[0] * 0.7
    assert result.scores["adapter"]["loss"] < result.scores["base"]["loss"] * 0.7


def test_run_folder_holds_exactly_the_promised_files(finished_run):
    _, result = finished_run
    names = {p.name for p in result.run_dir.iterdir()}
    expected = {
        "adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "chat_template.jinja", "generation_config.json", "config.yaml", "manifest.json", "metrics.jsonl",
        "loss_curve.png", "README.md", "checkpoints", "conversation.json",
    }
    assert names == expected, f"missing {sorted(expected - names)}, unexpected {sorted(names - expected)}"


def test_manifest_records_base_fingerprint_data_hashes_and_versions(finished_run, tiny_model_dir):
    from lora_ft.artifacts.fingerprint import fingerprint_model_path

    cfg, result = finished_run
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["base_model"]["fingerprint"] == fingerprint_model_path(tiny_model_dir)
    assert [s["role"] for s in manifest["data"]["sources"]] == ["train", "eval"]
    assert all(len(s["sha256"]) == 64 for s in manifest["data"]["sources"])
    assert manifest["data"]["sources"][0]["rows"] == 32
    assert manifest["metrics"]["steps"] == 30
    assert manifest["trainable_params"] > 0 and manifest["seed"] == 42
    assert manifest["environment"]["peft"] and manifest["environment"]["transformers"]


def test_reloaded_adapter_matches_in_memory_model(tiny_config, tiny_model_dir, without_cuda):
    """In fp32 on the CPU, so equality to 1e-5 means the same model on any machine (on a GPU, a bf16 run with
    Liger's kernels would differ from a plain fp32 reload by more than the saving could)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = validate_dict(tiny_config)
    captured = {}
    import lora_ft.training.finish as finish

    original = finish.final_scores

    def capture(model, data, tokenizer, batch_size):
        captured["model"] = model
        return original(model, data, tokenizer, batch_size)

    finish.final_scores = capture
    try:
        result = train(cfg)
    finally:
        finish.final_scores = original
    ids = torch.tensor([[1, 5, 9, 20, 33, 7, 2]])
    with torch.no_grad():
        in_memory = captured["model"](input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        reloaded = PeftModel.from_pretrained(base, result.run_dir).eval()(input_ids=ids).logits
    assert torch.allclose(in_memory, reloaded, atol=1e-5)


def test_every_lora_parameter_changed_and_no_base_parameter_did(tiny_config, tiny_model_dir, monkeypatch):
    """The trained model in memory (caught as the Trainer finishes) still holds every base tensor of the base
    file bit for bit, the file itself is untouched, and every LoRA B factor moved from its zero start."""
    import hashlib

    import transformers

    caught = {}
    trainer_train = transformers.Trainer.train

    def train_and_keep_the_model(self, *args, **kwargs):
        out = trainer_train(self, *args, **kwargs)
        caught["model"] = self.model
        return out

    monkeypatch.setattr(transformers.Trainer, "train", train_and_keep_the_model)
    weights = tiny_model_dir / "model.safetensors"
    digest_before = hashlib.sha256(weights.read_bytes()).hexdigest()
    result = train(validate_dict(tiny_config))

    adapter = load_file(result.run_dir / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "B starts at zero; training must move it"
    base = load_file(weights)
    in_memory = {
        name.removeprefix("base_model.model.").replace(".base_layer.", "."): value
        for name, value in caught["model"].named_parameters() if "lora_" not in name
    }
    assert set(in_memory) == set(base), "every base tensor is in the trained model under its own name"
    changed = [name for name, value in base.items() if not torch.equal(in_memory[name].detach().cpu(), value)]
    assert changed == []
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest_before


def test_finished_run_is_never_silently_overwritten(finished_run):
    cfg, _ = finished_run
    with pytest.raises(LoraftError, match="finished run"):
        train(cfg)


def test_completion_only_masking_leaves_prompt_tokens_out_of_the_loss(tiny_model_dir):
    from lora_ft.config import DataSpec
    from lora_ft.data.rows import Row, encode, to_example
    from lora_ft.model.loading import ModelSpec, load_tokenizer, resolve_model_source

    spec = ModelSpec(name=str(tiny_model_dir))
    tokenizer = load_tokenizer(spec, resolve_model_source(spec))
    data_spec = DataSpec(train={"path": "x.jsonl"})
    example = to_example(Row({"prompt": "Repeat after me: fox", "completion": "fox"}, "t:1"), "prompt_completion", data_spec, use_chat=True)
    item = encode(example, tokenizer, train_on="assistant", max_seq_length=64)
    trained = tokenizer.decode([t for t, lab in zip(item.input_ids, item.labels) if lab != -100])
    masked = tokenizer.decode([t for t, lab in zip(item.input_ids, item.labels) if lab == -100])
    assert trained == "fox<|im_end|>"
    # the prompt, and the newline the template puts after the end-of-turn token, stay out of the loss
    assert masked == "<|im_start|>user\nRepeat after me: fox<|im_end|>\n<|im_start|>assistant\n\n"


def test_the_model_cards_code_runs_as_written(finished_run):
    import re

    from peft import PeftModel

    _, result = finished_run
    card = (result.run_dir / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the snippet a user copies
    assert isinstance(scope["model"], PeftModel)
    assert "<this folder>" not in card


def test_the_train_summary_and_eval_agree_on_heldout_loss_and_stop_probability(tiny_run):
    """One question, one answer: train's held-out figures (manifest) are eval's on the same rows (CPU, fp32)."""
    from lora_ft.evaluate import EvalSettings, evaluate

    manifest = json.loads((tiny_run / "manifest.json").read_text())
    held, stop = manifest["metrics"]["heldout"], manifest["stop_tokens"]["after_training"]
    metrics = evaluate(tiny_run, regression=[], settings=EvalSettings(max_new_tokens=2), progress=False).task["metrics"]
    for who in ("base", "adapter"):
        assert metrics["loss"][who] == pytest.approx(held[who]["loss"], rel=1e-5)
        assert metrics["stop_probability"][who] == pytest.approx(stop[who]["mean_probability"], rel=1e-5)
    assert metrics["stop_probability"]["n"] == stop["adapter"]["answers"] == 8


def test_eval_of_a_qlora_run_on_a_machine_without_cuda_scores_the_full_precision_base_and_says_so(tiny_run, tmp_path):
    """A QLoRA run is scored on its 4-bit base as trained (tests/gpu); without CUDA that base cannot load, so eval
    uses the full-precision base, names it in the report, and still answers instead of refusing."""
    import shutil
    from pathlib import Path

    import torch
    import yaml

    from lora_ft.evaluate import EvalSettings, evaluate

    if torch.cuda.is_available():
        pytest.skip("this is the no-CUDA fallback; tests/gpu covers the 4-bit base")
    run = Path(shutil.copytree(tiny_run, tmp_path / "qlora-run"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["quantization"] = {"bits": 4, "quant_type": "nf4", "compute_dtype": "float32"}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    report = evaluate(run, regression=[], settings=EvalSettings(max_new_tokens=2), progress=False)
    assert report.settings["base_weights"] == "full precision (the run trained on a quantized base, which needs CUDA)"
    assert "(full precision (the run trained on a quantized base" in report.summary().splitlines()[1]
    held = json.loads((run / "manifest.json").read_text())["metrics"]["heldout"]
    assert report.task["metrics"]["loss"]["adapter"] == pytest.approx(held["adapter"]["loss"], rel=1e-5)
