"""One writer per folder: a second writer exits 2 at once naming the holder; a dead holder's lock is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lora_ft.errors import LoraftError
from lora_ft.artifacts.locks import hold, holder_of, lock_path

REPO = Path(__file__).resolve().parents[1]
HOLDER = textwrap.dedent("""
    import sys, time
    from lora_ft.artifacts.locks import hold
    with hold(sys.argv[1], "loraft train holder.yaml"):
        print("held", flush=True)
        time.sleep(120)
""")


@pytest.fixture
def holder():
    """Start another process that holds the lock of a folder; yields (process, folder); killed afterwards."""
    started = []

    def _start(folder: Path) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout.readline().strip() == "held"
        return process

    yield _start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_second_writer_is_refused_at_once_naming_the_holders_pid_and_command(tmp_path, holder):
    process = holder(tmp_path / "run")
    started = time.monotonic()
    with pytest.raises(LoraftError) as info:
        with hold(tmp_path / "run", "loraft train other.yaml"):
            pass
    assert time.monotonic() - started < 1.0
    assert f"is in use by pid {process.pid} (loraft train holder.yaml)" in str(info.value)
    assert holder_of(tmp_path / "run")["pid"] == process.pid


def test_lock_of_a_killed_process_is_taken_over(tmp_path, holder):
    process = holder(tmp_path / "run")
    process.send_signal(signal.SIGKILL)  # no cleanup runs: the lock file stays, naming a dead pid
    process.wait()
    assert lock_path(tmp_path / "run").exists() and holder_of(tmp_path / "run") is None
    with hold(tmp_path / "run", "loraft train mine.yaml"):
        assert holder_of(tmp_path / "run")["pid"] == os.getpid()
    assert not lock_path(tmp_path / "run").exists()


def test_released_lock_leaves_no_file_and_no_folder_made_for_it(tmp_path):
    with hold(tmp_path / "a" / "b" / "run", "x"):
        assert (tmp_path / "a" / "b" / ".run-loraft.lock").is_file()
    assert list(tmp_path.iterdir()) == []


def test_train_on_a_folder_another_process_writes_exits_2_before_preflight(tiny_config, write_yaml, run_cli, holder, monkeypatch):
    import lora_ft.train as train_module

    monkeypatch.setattr(train_module, "preflight", lambda *a, **k: pytest.fail("preflight ran although the folder is taken"))
    process = holder(Path(tiny_config["output_dir"]))
    code, _, err = run_cli("train", write_yaml(tiny_config))
    assert code == 2 and err == (
        f"error: output_dir {tiny_config['output_dir']} is in use by pid {process.pid} (loraft train holder.yaml); "
        "wait for it to finish or choose another folder (one writer per folder)\n"
    )


def test_merge_and_eval_out_folders_are_locked_too(tmp_path, tiny_run, run_cli, holder):
    merged, report = tmp_path / "merged", tmp_path / "report"
    holder(merged), holder(report)
    code, _, err = run_cli("merge", "--adapter", tiny_run, "--out", merged)
    assert code == 2 and "--out" in err and "is in use by pid" in err and not merged.exists()
    code, _, err = run_cli("eval", "--adapter", tiny_run, "--no-regression", "--out", report)
    assert code == 2 and "is in use by pid" in err and not report.exists()


def test_output_dir_in_a_folder_it_cannot_write_exits_2_in_one_line(tiny_config, write_yaml, run_cli):
    tiny_config["output_dir"] = "/sys/loraft-run"  # not writable even for root
    code, _, err = run_cli("train", write_yaml(tiny_config))
    assert code == 2 and err.startswith("error: output_dir /sys/loraft-run: cannot write in /sys (") and err.count("\n") == 1


def test_output_dir_below_a_regular_file_exits_2_in_one_line(tiny_config, tmp_path, write_yaml, run_cli):
    (tmp_path / "notes.txt").write_text("x")
    tiny_config["output_dir"] = str(tmp_path / "notes.txt" / "run")
    code, _, err = run_cli("train", write_yaml(tiny_config))
    assert code == 2
    assert err == f"error: output_dir {tmp_path / 'notes.txt' / 'run'}: {tmp_path / 'notes.txt'} is a file, not a folder; choose a path outside it\n"
