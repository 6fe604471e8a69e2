"""Guards: signals stop a run cleanly at a step boundary; non-finite numbers never reach a checkpoint."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conftest import build_tokenizer, save_tiny_model
from lora_ft.artifacts.checkpoints import latest_valid_checkpoint, list_checkpoints, validate_checkpoint
from lora_ft.config_io import load_config
from lora_ft.training.guards import NumericFault, SpikeDetector
from lora_ft.train import train
from test_checkpoints import STEPS, loss_steps, small_config, start_cli, wait_for_step, write_config


def run_state(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "run_state.json").read_text())


def interrupt_training(tmp_path, tiny_model_dir, *, at_step: int, sig: int):
    """Start `loraft train` in a child process (a signal sent to the test process itself could outlive training
    and stop pytest), send `sig` once step `at_step` is logged; returns (config path, exit code, stderr)."""
    config = write_config(tmp_path, small_config(tmp_path, tiny_model_dir, save_steps=100))
    proc = start_cli(config)
    wait_for_step(tmp_path / "run", at_step, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return config, proc.returncode, err


def test_sigterm_saves_at_the_next_step_exits_143_and_a_plain_rerun_resumes(tmp_path, tiny_model_dir, run_cli):
    config, code, err = interrupt_training(tmp_path, tiny_model_dir, at_step=3, sig=signal.SIGTERM)

    assert code == 143
    last = err.strip().splitlines()[-1]
    found = re.fullmatch(
        rf"interrupted: SIGTERM at step (\d+): checkpoint-\1 saved; resume with: loraft train {config} --resume "
        rf"\(a plain `loraft train {config}` resumes it too\)",
        last,
    )
    assert found, last
    step = int(found.group(1))
    checkpoint, _ = latest_valid_checkpoint(tmp_path / "run" / "checkpoints")
    assert checkpoint.name == f"checkpoint-{step}"  # save_steps=100: only the signal saved it
    assert run_state(tmp_path / "run")["status"] == "interrupted"
    assert not (tmp_path / "run" / "manifest.json").exists()

    code, _, err = run_cli("train", config)

    assert code == 0, err
    assert f"from checkpoint-{step} (step {step})" in " ".join(err.split())
    assert loss_steps(tmp_path / "run") == list(range(1, STEPS + 1))


def test_first_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, tiny_model_dir):
    _, code, err = interrupt_training(tmp_path, tiny_model_dir, at_step=2, sig=signal.SIGINT)

    assert code == 130
    assert re.search(r"interrupted: SIGINT at step \d+: checkpoint-\d+ saved; resume with: loraft train", err)
    step = int(re.search(r"at step (\d+)", err).group(1))
    assert validate_checkpoint(tmp_path / "run" / "checkpoints" / f"checkpoint-{step}") is None
    assert max(loss_steps(tmp_path / "run")) == step


def test_second_ctrl_c_exits_at_once_without_saving(tmp_path, tiny_model_dir, run_cli, monkeypatch):
    # In process and deterministic: both signals are raised in the main thread at step 2, inside the
    # training loop where loraft's handlers are installed (two signals sent from outside can coalesce).
    import lora_ft.training.guards as guards

    original = guards.SignalCallback.on_step_end

    def press_ctrl_c_twice(self, args, state, control, **kwargs):
        if state.global_step == 2:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(guards.SignalCallback, "on_step_end", press_ctrl_c_twice)
    config = write_config(tmp_path, small_config(tmp_path, tiny_model_dir, save_steps=100))

    code, _, err = run_cli("train", config)

    assert code == 130
    assert "interrupted: stopped at once without saving; no checkpoint saved yet; resume with:" in err
    assert run_state(tmp_path / "run")["status"] == "interrupted"
    assert not list((tmp_path / "run" / "checkpoints").glob("checkpoint-*"))


# ---------------------------------------------------------------------------------------------
# Numeric faults, from a base whose embedding of '~' is NaN: every batch holding the one '~' row
# has a NaN loss, deterministically, and no other batch does.


@pytest.fixture(scope="module")
def poisoned_model_dir(tmp_path_factory) -> Path:
    path = save_tiny_model(tmp_path_factory.mktemp("poisoned") / "model")
    tilde = build_tokenizer().convert_tokens_to_ids("~")
    weights = load_file(str(path / "model.safetensors"))
    weights["model.embed_tokens.weight"][tilde] = float("nan")
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def poisoned_config(tmp_path: Path, model_dir: Path, **training) -> dict:
    cfg = small_config(tmp_path, model_dir, **training)
    rows = [json.loads(line) for line in Path(cfg["data"]["train"]).read_text().splitlines()]
    rows[5] = {"prompt": "Repeat after me: ~", "completion": "~"}
    Path(cfg["data"]["train"]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return cfg


# adamw_torch: each step is read back at once. adamw_torch_fused (the default on CUDA): the step is checked and its
# update cancelled on the device, and judged at the next log or checkpoint (here up to 4 steps later).
FAULT_PATHS = [{"optimizer": "adamw_torch"}, {"optimizer": "adamw_torch_fused", "logging_steps": 5, "save_steps": 4}]


@pytest.mark.parametrize("path", FAULT_PATHS, ids=["read-each-step", "judged-on-device"])
def test_nan_loss_stops_naming_the_step_and_causes_and_keeps_the_last_good_checkpoint(tmp_path, poisoned_model_dir, run_cli, path):
    config = write_config(tmp_path, poisoned_config(tmp_path, poisoned_model_dir, **path))

    code, _, err = run_cli("train", config)

    assert code == 2
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    step = int(re.search(r"error: step (\d+): loss is nan; stopped before applying it", err).group(1))
    assert "learning rate" in err and "lora.alpha / lora.rank" in err and "fp16 overflow" in err and "masked" in err
    checkpoints = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert all(int(p.name.split("-")[1]) < step for p in checkpoints)
    for checkpoint in checkpoints:
        assert validate_checkpoint(checkpoint) is None
        assert all(t.isfinite().all() for t in load_file(str(checkpoint / "adapter_model.safetensors")).values())
    assert run_state(tmp_path / "run")["status"] == "failed"


@pytest.mark.parametrize("optimizer", ["adamw_torch", "adamw_torch_fused"], ids=["read-each-step", "cancelled-on-device"])
def test_nan_policy_skip_skips_bad_steps_and_finishes_with_finite_weights(tmp_path, poisoned_model_dir, optimizer):
    cfg = load_config(write_config(tmp_path, poisoned_config(tmp_path, poisoned_model_dir, nan_policy="skip", optimizer=optimizer)))

    result = train(cfg)

    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in records if r.get("event") == "skipped_step"]
    # 16 rows in batches of 4: the '~' row is in one batch per 4-step epoch, 12 steps -> 3 bad steps.
    assert len(skipped) == 3 and len({(s - 1) // 4 for s in skipped}) == 3
    assert all(r["reason"] == "loss is nan" for r in records if r.get("event") == "skipped_step")
    weights = load_file(str(result.run_dir / "adapter_model.safetensors"))
    assert all(t.isfinite().all() for t in weights.values())
    assert loss_steps(result.run_dir) == list(range(1, STEPS + 1))


def test_skipping_more_steps_than_allowed_stops_the_run(tmp_path, poisoned_model_dir):
    cfg = load_config(
        write_config(tmp_path, poisoned_config(tmp_path, poisoned_model_dir, nan_policy="skip", max_skipped_steps=1))
    )
    with pytest.raises(NumericFault, match=r"step \d+: 2 steps skipped .*training.max_skipped_steps: 1"):
        train(cfg)


def test_grad_norm_spike_is_flagged_against_the_running_median():
    detector = SpikeDetector(factor=10.0, window=50, warmup=5)
    flagged = [detector.observe(x) for x in [1.0, 1.2, 0.9, 1.1, 1.0, 1.05, 25.0, 1.0, 9.0]]
    assert flagged == [None] * 6 + [1.025, None, None]


def test_spike_detector_waits_for_a_history():
    detector = SpikeDetector(warmup=5)
    assert [detector.observe(x) for x in [1.0, 100.0, 1.0, 1.0]] == [None] * 4
