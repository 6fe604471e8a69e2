"""Several processes through accelerate: config generated from the YAML, step accounting, rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lora_ft.config_io import validate_dict
from lora_ft.errors import ConfigError
from lora_ft.training import distributed
from lora_ft.training.distributed import accelerate_config, effective_batch


def test_ddp_config_follows_precision_and_process_count():
    cfg = validate_dict({"model": {"name": "m"}})
    content = accelerate_config(cfg.distributed, 4, precision="bf16")
    assert content["distributed_type"] == "MULTI_GPU" and content["num_processes"] == 4
    assert content["mixed_precision"] == "bf16"
    assert accelerate_config(cfg.distributed, 2, precision="fp32", cpu=True)["distributed_type"] == "MULTI_CPU"


def test_fsdp_config_has_the_settings_lora_needs():
    cfg = validate_dict({"model": {"name": "m"}, "distributed": {"strategy": "fsdp"}})
    fsdp = accelerate_config(cfg.distributed, 2, precision="bf16")["fsdp_config"]
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is True and fsdp["fsdp_version"] == 2
    with pytest.raises(ConfigError, match="fsdp needs GPUs"):
        accelerate_config(cfg.distributed, 2, precision="fp32", cpu=True)


def test_cpu_processes_are_launched_with_every_gpu_hidden(monkeypatch, tmp_path):
    """--gpus N --cpu on a machine with a GPU: each rank would take cuda:0 and NCCL refuse a duplicate GPU."""
    launched = {}

    def call(command, env):
        launched.update(command=command, env=env)
        return 0

    monkeypatch.setattr(distributed.subprocess, "call", call)
    cfg = validate_dict({"model": {"name": "m"}})
    assert distributed.launch(tmp_path / "c.yaml", ["train", "c.yaml"], cfg, 2, cpu=True) == 0
    assert launched["env"]["CUDA_VISIBLE_DEVICES"] == "" and launched["env"]["ACCELERATE_USE_CPU"] == "true"
    assert "--nproc_per_node=2" in launched["command"]


def test_deepspeed_without_the_package_is_a_clear_error(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real_find_spec(name, *a))
    cfg = validate_dict({"model": {"name": "m"}, "distributed": {"strategy": "deepspeed_zero3"}})
    with pytest.raises(ConfigError, match="pip install deepspeed"):
        accelerate_config(cfg.distributed, 2, precision="bf16")


def test_effective_batch_scales_with_world_size():
    cfg = validate_dict({"model": {"name": "m"}, "training": {"batch_size": 4, "gradient_accumulation_steps": 2}})
    assert effective_batch(cfg) == 8  # one process here
    assert effective_batch(cfg, 4) == 32


def test_gpus_option_without_enough_gpus_is_a_user_error(tiny_config, write_yaml, run_cli):
    have = torch.cuda.device_count()  # 0 on CI, any number on a GPU machine: ask for more than it has
    ask = max(have + 1, 2)  # --gpus 1 is a plain one-process run
    code, _, err = run_cli("train", write_yaml(tiny_config), "--gpus", str(ask))
    assert code == 2 and f"--gpus {ask}: this machine has {have} CUDA GPU(s)" in err


def test_two_process_gloo_ddp_run_writes_one_adapter_from_rank_zero(tiny_config, write_yaml, tmp_path):
    tiny_config["training"].update(max_steps=6, batch_size=4, save_steps=3)
    config = write_yaml(tiny_config)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "lora_ft", "train", str(config), "--gpus", "2", "--cpu"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["distributed"] == {"world_size": 2, "strategy": "ddp", "effective_batch_size": 8}
    assert manifest["metrics"]["steps"] == 6
    # 32 rows / (4 per rank x 2 ranks) = 4 steps per epoch: 6 steps is 1.5 epochs
    assert manifest["metrics"]["epochs"] == pytest.approx(1.5)
    assert (run / "adapter_model.safetensors").is_file()
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in losses if "loss" in r]
    assert logged == sorted(set(logged)), "rank 0 alone logs: no step twice"
    assert proc.stdout.count("adapter written to") == 1  # rank 0 alone reports
