"""Several GPUs through accelerate: `loraft train CONFIG --gpus N` relaunches itself under `accelerate launch`.

The accelerate config is generated from the YAML's `distributed:` section (DDP, FSDP full-shard with the
settings LoRA and QLoRA need, or DeepSpeed ZeRO-2/3); users with their own accelerate config run
`accelerate launch -m lora_ft train CONFIG` instead. Step accounting: the Trainer splits the data across
ranks, so the effective batch is batch_size x gradient_accumulation_steps x world size (recorded in the
manifest). Only rank 0 writes to the run folder.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from lora_ft.config import DistributedSpec, RunConfig
from lora_ft.errors import ConfigError


def world_size() -> int:
    # torchrun and accelerate launch (which runs torchrun for GPUs) set these for every process.
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def effective_batch(cfg: RunConfig, processes: int | None = None) -> int:
    return cfg.training.batch_size * cfg.training.gradient_accumulation_steps * (processes or world_size())


def accelerate_config(spec: DistributedSpec, num_processes: int, *, precision: str, cpu: bool = False) -> dict:
    """An accelerate config file's content for this run."""
    mixed = spec.mixed_precision
    if mixed == "auto":
        mixed = {"bf16": "bf16", "fp16": "fp16"}.get(precision, "no")
    config: dict = {
        "compute_environment": "LOCAL_MACHINE",
        "num_machines": 1,
        "machine_rank": 0,
        "num_processes": num_processes,
        "mixed_precision": mixed,
        "use_cpu": cpu,
        "distributed_type": "MULTI_CPU" if cpu else "MULTI_GPU",
        "main_training_function": "main",
        "rdzv_backend": "static",
        "same_network": True,
    }
    if spec.strategy == "fsdp":
        if cpu:
            raise ConfigError("distributed.strategy: fsdp needs GPUs; use ddp on the CPU")
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_cpu_ram_efficient_loading": spec.fsdp_cpu_ram_efficient_loading,
            "fsdp_offload_params": spec.fsdp_offload_params,
            "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            # LoRA mixes frozen and trainable parameters in one wrapped layer; FSDP2 handles that per parameter.
            "fsdp_activation_checkpointing": False,
        }
    elif spec.strategy.startswith("deepspeed"):
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(f"distributed.strategy: {spec.strategy} needs the deepspeed package; pip install deepspeed")
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = {
            "zero_stage": 3 if spec.strategy.endswith("3") else 2,
            "offload_optimizer_device": "none",
            "offload_param_device": "none",
            "zero3_init_flag": False,
            "zero3_save_16bit_model": False,
        }
    return config


def launch(config_path: Path, argv: list[str], cfg: RunConfig, num_processes: int, *, cpu: bool = False) -> int:
    """Run `python -m lora_ft train ...` in N processes under accelerate; returns the exit code."""
    import torch  # lazy: ~1.3 s; `loraft train` imports this module before it refuses a config typo (0.6 s)

    if not cpu and torch.cuda.device_count() < num_processes:
        raise ConfigError(
            f"--gpus {num_processes}: this machine has {torch.cuda.device_count()} CUDA GPU(s); use --gpus "
            f"{max(torch.cuda.device_count(), 1)} or run on a bigger machine"
        )
    from lora_ft.model.loading import resolve_precision  # lazy: torch + transformers, ~2.6 s; see `import torch` above

    content = accelerate_config(cfg.distributed, num_processes, precision=resolve_precision(cfg.training.precision), cpu=cpu)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="loraft-accelerate-", delete=False) as handle:
        yaml.safe_dump(content, handle)
    env = dict(os.environ, NCCL_NVLS_ENABLE=os.environ.get("NCCL_NVLS_ENABLE", "0"))
    if cpu:
        # The processes must not see a GPU the machine has: on one, each rank would take cuda:0 and NCCL refuses
        # ("Duplicate GPU detected") instead of the gloo run --cpu asks for.
        env.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="true")
        # accelerate launches CPU jobs through mpirun only; torchrun gives N gloo processes on one machine.
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={num_processes}",
                   f"--master_port={_free_port()}", "-m", "lora_ft", *argv]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", handle.name, "-m", "lora_ft", *argv]
    try:
        return subprocess.call(command, env=env)
    finally:
        Path(handle.name).unlink(missing_ok=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
