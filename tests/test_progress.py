"""The progress line reports the recent window's speed; metrics.jsonl keeps both rates."""

from __future__ import annotations

import json
from types import SimpleNamespace

from rich.console import Console

from lora_ft.training import progress


def test_tokens_per_second_is_the_rate_since_the_previous_log_line(tmp_path, monkeypatch):
    clock = {"now": 100.0}
    monkeypatch.setattr(progress.time, "time", lambda: clock["now"])
    console = Console(record=True, width=200)
    callback = progress.MetricsCallback(tmp_path / "metrics.jsonl", console)
    state = SimpleNamespace(is_world_process_zero=True, global_step=0, max_steps=30, num_input_tokens_seen=0, epoch=0.0)
    callback.on_train_begin(None, state, None)

    # first window: a slow start (1,000 tokens in 10 s); second: the steady rate (4,000 tokens in 2 s)
    for now, step, seen in ((110.0, 10, 1000), (112.0, 20, 5000)):
        clock["now"], state.global_step, state.num_input_tokens_seen = now, step, seen
        callback.on_log(None, state, None, logs={"loss": 1.0})

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens_per_s"] for r in records] == [100.0, 2000.0]
    assert records[-1]["tokens_per_s_mean"] == round(5000 / 12, 1)
    assert records[-1]["elapsed_s"] == 12.0
    assert "2000 tok/s" in console.export_text().splitlines()[-1]


def test_checkpoint_time_is_left_out_of_the_next_window(tmp_path, monkeypatch):
    clock = {"now": 0.0}
    monkeypatch.setattr(progress.time, "time", lambda: clock["now"])
    callback = progress.MetricsCallback(tmp_path / "metrics.jsonl", Console(record=True))
    state = SimpleNamespace(is_world_process_zero=True, global_step=0, max_steps=30, num_input_tokens_seen=0, epoch=0.0)
    callback.on_train_begin(None, state, None)
    clock["now"], state.global_step, state.num_input_tokens_seen = 1.0, 5, 500
    callback.on_log(None, state, None, logs={"loss": 1.0})
    clock["now"] = 31.0  # a 30 s checkpoint save
    callback.on_save(None, state, None)
    clock["now"], state.global_step, state.num_input_tokens_seen = 32.0, 10, 1000
    callback.on_log(None, state, None, logs={"loss": 0.9})

    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["tokens_per_s"] == 500.0


def test_the_progress_line_and_record_carry_the_peak_gpu_memory(tmp_path, monkeypatch):
    clock = {"now": 0.0}
    monkeypatch.setattr(progress.time, "time", lambda: clock["now"])
    monkeypatch.setattr(progress, "peak_gpu_gib", lambda: 41.27)  # as torch.cuda.max_memory_allocated would give
    console = Console(record=True, width=200)
    callback = progress.MetricsCallback(tmp_path / "metrics.jsonl", console)
    state = SimpleNamespace(is_world_process_zero=True, global_step=0, max_steps=30, num_input_tokens_seen=0, epoch=0.0)
    callback.on_train_begin(None, state, None)
    clock["now"], state.global_step, state.num_input_tokens_seen = 2.0, 5, 3000
    callback.on_log(None, state, None, logs={"loss": 1.0})

    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["peak_gpu_gib"] == 41.27
    assert "1500 tok/s  peak GPU 41.3 GiB" in console.export_text().splitlines()[-1]


def test_the_train_summary_shows_mean_speed_next_to_peak_memory(tmp_path):
    from lora_ft.train import speed_line

    records = [{"step": 5, "loss": 2.0, "tokens_per_s_mean": 900.0}, {"step": 10, "loss": 1.5, "tokens_per_s_mean": 14996.6}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert speed_line(tmp_path, 50.16) == "14,997 tok/s (mean), peak GPU memory 50.16 GiB"
    assert speed_line(tmp_path, None).endswith("peak GPU memory n/a (no CUDA)")
