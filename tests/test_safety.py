"""Safety: secrets never reach the run folder or the terminal; pickle weights load only when opted in."""

from __future__ import annotations

import shutil

import torch
import yaml
from safetensors.torch import load_file

HUB_TOKEN = "hf_" + "Zq8" * 12
CONFIG_TOKEN = "hf_" + "Kp4" * 12
URL_PASSWORD = "s3cr3tPassw0rd"


def test_secrets_from_env_and_config_appear_in_no_file_and_no_output(tmp_path, tiny_config, run_cli, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", HUB_TOKEN)
    tiny_config["data"]["system_prompt"] = (
        f"Mirror at https://alice:{URL_PASSWORD}@example.com/data, key {CONFIG_TOKEN}. Repeat the word."
    )
    tiny_config["training"].update(max_steps=4, save_steps=2, logging_steps=1, max_seq_length=256)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config), encoding="utf-8")

    code, out, err = run_cli("train", config)

    assert code == 0, err
    run = tmp_path / "run"
    files = [p for p in run.rglob("*") if p.is_file()]
    assert len(files) > 20 and any(p.parent.name == "checkpoint-4" for p in files)
    for secret in (HUB_TOKEN, CONFIG_TOKEN, URL_PASSWORD):
        leaks = [str(p.relative_to(run)) for p in files if secret.encode() in p.read_bytes()]
        assert leaks == [], f"{secret[:6]}... found in {leaks}"
        assert secret not in out and secret not in err
    assert not list(run.rglob("training_args.bin"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["system_prompt"] == "Mirror at https***example.com/data, key ***. Repeat the word."


def test_error_lines_redact_a_credential_in_a_config_value(tmp_path, tiny_config, run_cli):
    tiny_config["data"]["train"] = f"/nonexistent/{CONFIG_TOKEN}/train.jsonl"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config), encoding="utf-8")

    code, _, err = run_cli("train", config)

    assert code == 2
    assert "data file not found" in err and CONFIG_TOKEN not in err and "***" in err


def _pickle_only_copy(tiny_model_dir, tmp_path):
    target = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, target)
    torch.save(load_file(str(target / "model.safetensors")), target / "pytorch_model.bin")
    (target / "model.safetensors").unlink()
    return target


def test_pickle_only_model_is_refused_unless_the_config_opts_in(tmp_path, tiny_config, tiny_model_dir, run_cli):
    tiny_config["model"]["name"] = str(_pickle_only_copy(tiny_model_dir, tmp_path))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config), encoding="utf-8")

    refused, _, err = run_cli("validate", config)
    allowed, out, _ = run_cli("validate", config, "--set", "model.allow_pickle_weights=true")

    assert refused == 2 and "only pickle weights (pytorch_model.bin)" in err
    assert allowed == 0 and "ok: config is valid" in out


def test_pickle_weights_load_when_opted_in_and_match_the_safetensors_model(tmp_path, tiny_model_dir):
    from lora_ft.config import ModelSpec
    from lora_ft.model.loading import load_base_model, resolve_model_source

    pickled = _pickle_only_copy(tiny_model_dir, tmp_path)
    spec = ModelSpec(name=str(pickled), allow_pickle_weights=True)
    model = load_base_model(spec, resolve_model_source(spec), "fp32")
    reference = load_file(str(tiny_model_dir / "model.safetensors"))
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], reference["model.embed_tokens.weight"])
