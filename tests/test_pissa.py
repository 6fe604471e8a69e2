"""PiSSA / OLoRA runs: they train against W minus the initial low-rank part, so loraft saves the adapter
converted to an ordinary rank-2r adapter on the original W. Any consumer (plain PEFT, merge, inspect) then
applies it to the base as it is, and gets the trained model."""

from __future__ import annotations

import json

import pytest
import torch

IDS = torch.tensor([[1, 5, 9, 20, 33, 7, 2, 40, 100, 250]])


@pytest.fixture(scope="module")
def pissa_run(tmp_path_factory, tiny_model_dir):
    from conftest import copy_rows, write_jsonl
    from lora_ft.config_io import validate_dict
    from lora_ft.train import train

    root = tmp_path_factory.mktemp("pissa")
    cfg = {
        "model": {"name": str(tiny_model_dir)},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "init": "pissa"},
        "data": {"train": str(write_jsonl(root / "train.jsonl", copy_rows(16))),
                 "eval": str(write_jsonl(root / "eval.jsonl", copy_rows(4, 3))), "checks": {"leakage": "warn"}},
        # save_steps = max_steps: the last checkpoint is the trained adapter as training held it (unconverted).
        "training": {"max_steps": 8, "save_steps": 8, "eval_steps": 8, "batch_size": 8, "learning_rate": 3e-2, "max_seq_length": 48,
                     "precision": "fp32", "warmup_ratio": 0.0},
        "output_dir": str(root / "run"),
    }
    return train(validate_dict(cfg)).run_dir


def logits(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, str(adapter_dir)).eval()(input_ids=IDS).logits


def test_saved_pissa_adapter_on_the_original_base_gives_the_trained_model(pissa_run, tiny_model_dir, tmp_path):
    config = json.loads((pissa_run / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)  # rank 2r, same alpha/r
    manifest = json.loads((pissa_run / "manifest.json").read_text())
    assert manifest["lora"]["converted"]["from"] == "pissa"
    assert (manifest["lora"]["converted"]["trained_rank"], manifest["lora"]["converted"]["saved_rank"]) == (4, 8)
    assert not (pissa_run / "initial_adapter").exists()

    # The trained model: the last checkpoint as training held it. Its config still says pissa, so PEFT
    # decomposes the original base again (the same SVD) and applies the trained factors to the residual.
    checkpoint = next((pissa_run / "checkpoints").glob("checkpoint-8"))
    assert json.loads((checkpoint / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    trained = logits(tiny_model_dir, checkpoint)
    plain = logits(tiny_model_dir, pissa_run)  # plain PEFT, original base, nothing special
    assert float((plain - trained).abs().max()) <= 1e-4
    # What another engine computes from the unconverted factors: B A added to the original W. Far off.
    import shutil

    naive = shutil.copytree(checkpoint, tmp_path / "naive", ignore=shutil.ignore_patterns("optimizer*", "*.pt", "*.pth"))
    config = json.loads((naive / "adapter_config.json").read_text())
    (naive / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": True}))
    assert float((logits(tiny_model_dir, naive) - trained).abs().max()) > 1.0  # 5.4 measured


def test_merge_of_a_pissa_run_passes_its_own_check(pissa_run, tmp_path, run_cli):
    code, out, err = run_cli("merge", "--adapter", pissa_run, "--out", tmp_path / "merged")
    assert code == 0, err
    merged = json.loads((tmp_path / "merged" / "merge_manifest.json").read_text())
    assert merged["adapter"]["rank"] == 8
    assert merged["verification"]["logits"]["max_abs_diff"] <= 1e-4


def test_inspect_measures_a_converted_adapter_against_rank_2r(pissa_run, run_cli):
    code, out, err = run_cli("inspect", pissa_run)
    assert code == 0, err
    assert "(r=8," in out
    assert "pissa adapter saved converted to rank 8 (2 x 4)" in out
