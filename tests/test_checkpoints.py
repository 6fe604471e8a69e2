"""Checkpoints and resume: a killed run continues to the same adapter; a damaged checkpoint is never used."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import copy_rows, write_jsonl
from lora_ft.artifacts.checkpoints import (
    MANIFEST,
    latest_valid_checkpoint,
    list_checkpoints,
    validate_checkpoint,
)
from lora_ft.config_io import load_config
from lora_ft.errors import LoraftError
from lora_ft.artifacts.run_dir import file_sha256
from lora_ft.train import train

REPO = Path(__file__).resolve().parents[1]
STEPS = 12


def small_config(tmp_path: Path, model_dir: Path, name: str = "run", **training) -> dict:
    """Twelve logged steps, a checkpoint every two, LoRA dropout on so the RNG state matters."""
    train_file = tmp_path / "train.jsonl"
    if not train_file.exists():
        write_jsonl(train_file, copy_rows(16))
    return {
        "model": {"name": str(model_dir)},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.1},
        "data": {"train": str(train_file)},
        "training": {
            "max_steps": STEPS, "batch_size": 4, "learning_rate": 3e-2, "max_seq_length": 48, "logging_steps": 1,
            "save_steps": 2, "save_total_limit": 3, "precision": "fp32", "warmup_ratio": 0.0,
            "gradient_checkpointing": False, **training,
        },
        "output_dir": str(tmp_path / name),
    }


def write_config(tmp_path: Path, data: dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def adapter(run_dir: Path) -> dict:
    return load_file(str(Path(run_dir) / "adapter_model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def loss_steps(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


def start_cli(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # keep the caller's path
    return subprocess.Popen(
        [sys.executable, "-m", "lora_ft", "train", str(config), *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> int:
    """Poll metrics.jsonl until it shows `step`; returns the last step seen."""
    metrics = Path(run_dir) / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"training ended early: {proc.communicate()[1][-2000:]}"
        if metrics.is_file():
            steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.endswith("}")]
            if steps and max(steps) >= step:
                return max(steps)
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout}s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """An uninterrupted run of the same config and seed."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = load_config(write_config(tmp, small_config(tmp, tiny_model_dir)))
    return train(cfg).run_dir


def test_sigkill_at_a_random_step_then_resume_matches_uninterrupted_run(tmp_path, tiny_model_dir, reference):
    kill_at = random.Random(20261203).randint(3, STEPS - 2)  # seeded: the same step on every machine
    config = write_config(tmp_path, small_config(tmp_path, tiny_model_dir))
    proc = start_cli(config)
    seen = wait_for_step(tmp_path / "run", kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "manifest.json").exists(), f"killed at step {seen} (aimed at {kill_at})"

    result = train(load_config(config))  # no --resume: an unfinished run of the same config resumes by itself

    assert max_difference(adapter(result.run_dir), adapter(reference)) < 1e-5, f"killed at step {seen}"
    assert loss_steps(result.run_dir) == list(range(1, STEPS + 1)), f"killed at step {seen}"


def test_every_checkpoint_carries_a_manifest_and_no_pickled_training_args(reference):
    checkpoints = list_checkpoints(reference / "checkpoints")
    assert [p.name for p in checkpoints] == ["checkpoint-8", "checkpoint-10", "checkpoint-12"]  # save_total_limit 3
    for checkpoint in checkpoints:
        assert validate_checkpoint(checkpoint) is None
        assert not (checkpoint / "training_args.bin").exists()
        listed = json.loads((checkpoint / MANIFEST).read_text())["files"]
        assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= listed.keys()
    assert not (reference / "checkpoints" / ".partial").exists()


DAMAGE = {
    "optimizer file deleted": (lambda c: (c / "optimizer.pt").unlink(), "missing optimizer.pt"),
    "scheduler file deleted": (lambda c: (c / "scheduler.pt").unlink(), "missing scheduler.pt"),
    "rng file deleted": (lambda c: (c / "rng_state.pth").unlink(), "missing rng_state.pth"),
    "manifest missing (save torn)": (lambda c: (c / MANIFEST).unlink(), "did not finish"),
    "adapter truncated": (lambda c: _truncate(c / "adapter_model.safetensors"), "adapter_model.safetensors is"),
    "adapter byte flipped": (lambda c: _flip(c / "adapter_model.safetensors"), "checksum"),
    "optimizer byte flipped": (lambda c: _flip(c / "optimizer.pt"), "checksum"),
    "trainer state of another step": (lambda c: _restep(c / "trainer_state.json"), "trainer_state.json"),
}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def _restep(path: Path) -> None:
    # Rewrite the file and its manifest entry together: only the step check can catch it.
    state = json.loads(path.read_text())
    state["global_step"] = 3
    path.write_text(json.dumps(state))
    manifest_path = path.parent / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][path.name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_checkpoint_is_named_and_skipped_for_the_previous_good_one(kind, tmp_path, reference):
    folder = tmp_path / "checkpoints"
    shutil.copytree(reference / "checkpoints", folder)
    damage, expected = DAMAGE[kind]
    damage(folder / "checkpoint-12")

    chosen, skipped = latest_valid_checkpoint(folder)

    assert chosen.name == "checkpoint-10"
    assert [p.path.name for p in skipped] == ["checkpoint-12"]
    assert expected in skipped[0].reason


def unfinished_copy(reference: Path, tmp_path: Path) -> Path:
    """The reference run as a crash after its last save would leave it: no manifest, state 'running'."""
    write_jsonl(tmp_path / "train.jsonl", copy_rows(16))
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "manifest.json").unlink()
    digest = file_sha256(tmp_path / "train.jsonl") if (tmp_path / "train.jsonl").exists() else None
    (run / "run_state.json").write_text(json.dumps({"status": "running", "data": {"train": digest}}))
    return run


def test_resume_skips_a_torn_last_checkpoint_and_still_matches(tmp_path, tiny_model_dir, reference, capsys):
    run = unfinished_copy(reference, tmp_path)
    (run / "checkpoints" / "checkpoint-12" / "optimizer.pt").unlink()
    config = write_config(tmp_path, small_config(tmp_path, tiny_model_dir))

    result = train(load_config(config), resume=True)

    assert "checkpoint-12 is damaged (missing optimizer.pt); skipped" in " ".join(capsys.readouterr().err.split())
    assert max_difference(adapter(result.run_dir), adapter(reference)) < 1e-5
    assert loss_steps(run) == list(range(1, STEPS + 1))


def test_resume_with_a_changed_config_is_refused_naming_the_keys(tmp_path, tiny_model_dir, reference, run_cli):
    unfinished_copy(reference, tmp_path)
    changed = small_config(tmp_path, tiny_model_dir, learning_rate=1e-3, logging_steps=2)
    changed["lora"]["rank"] = 8

    code, _, err = run_cli("train", write_config(tmp_path, changed))

    assert code == 2
    lines = [line for line in err.splitlines() if not line.startswith("warning: ")]  # data-check warnings may precede
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "(lora.rank, training.learning_rate changed)" in err  # logging_steps is a safe key
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_resume_flag_without_an_unfinished_run_is_refused(tmp_path, tiny_model_dir, run_cli):
    code, _, err = run_cli("train", write_config(tmp_path, small_config(tmp_path, tiny_model_dir)), "--resume")
    assert code == 2
    assert "holds no unfinished run" in err
    assert not (tmp_path / "run").exists()


def test_resume_refuses_changed_training_data(tmp_path, tiny_model_dir, reference):
    run = unfinished_copy(reference, tmp_path)
    state = json.loads((run / "run_state.json").read_text())
    (run / "run_state.json").write_text(json.dumps({**state, "data": {"train": "0" * 64}}))
    with pytest.raises(LoraftError, match="data.train: the file changed since the unfinished run"):
        train(load_config(write_config(tmp_path, small_config(tmp_path, tiny_model_dir))))


def test_full_disk_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    import lora_ft.artifacts.checkpoints as checkpoints

    folder = tmp_path / "run" / "checkpoints"
    # Room for the first three checkpoints only.
    monkeypatch.setattr(checkpoints, "free_bytes", lambda path: 10**12 if len(list_checkpoints(folder)) < 3 else 10**6)
    cfg = load_config(write_config(tmp_path, small_config(tmp_path, tiny_model_dir)))

    with pytest.raises(LoraftError, match=r"disk full at .*checkpoint-8 needs ~\d+ MiB, 1 MiB free; the last good checkpoint checkpoint-6 is intact"):
        train(cfg)

    assert [p.name for p in list_checkpoints(folder)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert validate_checkpoint(folder / "checkpoint-6") is None
    assert json.loads((tmp_path / "run" / "run_state.json").read_text())["status"] == "failed"
