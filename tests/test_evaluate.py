"""loraft eval: metrics on hand-made cases, base vs adapter on the same tokens, reports, CI exit codes, eval during training."""

from __future__ import annotations

import json
import math

import pytest

from conftest import copy_rows, write_jsonl
from lora_ft.config_io import validate_dict
from lora_ft.evaluate import DEFAULT_REGRESSION, EvalSettings, Gates, evaluate
from lora_ft.metrics import example_losses, heldout_loss
from lora_ft.metrics import (
    contains,
    exact_match,
    json_fields,
    json_valid,
    lcs_length,
    parse_json,
    regex_match,
    rouge_l,
    score_generation,
)
from lora_ft.errors import EXIT_GATE, LoraftError
from lora_ft.train import train

# ---------------------------------------------------------------------------------------------
# Metric functions


def test_exact_match_ignores_only_surrounding_whitespace():
    assert exact_match("  Paris\n", "Paris") == 1.0
    assert exact_match("paris", "Paris") == 0.0
    assert exact_match("Paris.", "Paris") == 0.0


def test_contains_is_case_insensitive_substring():
    assert contains("The capital is PARIS.", "Paris") == 1.0
    assert contains("The capital is Lyon.", "Paris") == 0.0


def test_regex_match_searches_and_bad_pattern_is_a_user_error():
    assert regex_match('{"time": "18:00"}', r'"time": "\d\d:\d\d"') == 1.0
    assert regex_match("at six", r"^\d+$") == 0.0
    with pytest.raises(LoraftError, match="not a valid regular expression"):
        regex_match("x", "(")


def test_json_valid_accepts_one_code_fence_and_rejects_trailing_text():
    assert json_valid('{"a": 1}') == 1.0
    assert json_valid('```json\n{"a": 1}\n```') == 1.0
    assert json_valid('{"a": 1} and more') == 0.0
    assert parse_json("```\n[1, 2]\n```") == [1, 2]


def test_json_fields_is_the_share_of_reference_fields_with_equal_values():
    reference = '{"title": "Lunch", "day": "Friday", "time": "13:00", "place": "home"}'
    assert json_fields('{"title": "Lunch", "day": "Friday", "time": "12:00"}', reference) == 0.5
    assert json_fields(reference, reference) == 1.0
    assert json_fields("not json", reference) == 0.0
    assert json_fields("[1, 2]", "[1, 2]") == 1.0 and json_fields("[2, 1]", "[1, 2]") == 0.0


def test_lcs_and_rouge_l_on_textbook_cases():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # CLRS 15.4
    # LCS "the cat on the mat" = 5 of 6 tokens each way: P = R = F = 5/6
    assert rouge_l("the cat sat on the mat", "The cat is on the mat") == pytest.approx(5 / 6)
    # hypothesis 2 tokens, reference 4, LCS 2: P = 1, R = 0.5, F = 2/3
    assert rouge_l("police killed", "police killed the gunman") == pytest.approx(2 / 3)
    assert rouge_l("", "") == 1.0 and rouge_l("a", "") == 0.0 and rouge_l("x y", "a b") == 0.0


def test_score_generation_applies_json_and_regex_only_where_they_fit():
    plain = score_generation("It is Paris.", True, "Paris")
    assert plain == {"exact_match": 0.0, "contains": 1.0, "rouge_l": 0.0, "stops": 1.0}
    with_json = score_generation('{"a": 1, "b": 2}', False, '{"a": 1, "b": 3}', regex=r'"a"')
    # tokens {"a": | 1, | "b": | 2} vs ... 3}: LCS 3 of 4 each way, ROUGE-L 0.75
    assert with_json == {"exact_match": 0.0, "contains": 0.0, "rouge_l": 0.75, "stops": 0.0, "regex": 1.0,
                         "json_valid": 1.0, "json_fields": 0.5}
    keyed = score_generation("The capital of France is Paris.", True, "France's capital is Paris.", answer="paris")
    assert keyed["contains"] == 1.0


def test_gates_reject_unknown_metric_names():
    with pytest.raises(LoraftError, match="unknown metric exact"):
        Gates({"exact": 0.5})


# ---------------------------------------------------------------------------------------------
# On a trained tiny run




@pytest.fixture(scope="module")
def loaded(tiny_run):
    from lora_ft.serving.inference import load_for_inference

    return load_for_inference(tiny_run)


@pytest.fixture(scope="module")
def small_regression(tmp_path_factory):
    rows = [json.loads(line) for line in DEFAULT_REGRESSION.read_text().splitlines()[:6]]
    return write_jsonl(tmp_path_factory.mktemp("regr") / "regression.jsonl", rows)


def test_per_example_losses_do_not_depend_on_batching(loaded, tiny_run):
    from lora_ft.evaluate import build_items
    from lora_ft.artifacts.adapter_run import AdapterRun

    run = AdapterRun.load(tiny_run)
    from lora_ft.data.rows import read_rows

    items = build_items(read_rows(run.config.data.eval), run.config.data, loaded.conversation("run"), max_seq_length=64)
    encoded = [i.encoded for i in items]
    pad = loaded.tokenizer("run").pad_token_id
    one = example_losses(loaded.model, encoded, pad_token_id=pad, batch_size=1)
    four = example_losses(loaded.model, encoded, pad_token_id=pad, batch_size=4)
    assert [c for _, c in one] == [c for _, c in four] and all(c > 0 for _, c in one)
    assert [s for s, _ in one] == pytest.approx([s for s, _ in four], rel=1e-4)
    total = heldout_loss(loaded.model, encoded, pad_token_id=pad, batch_size=3)
    assert total["loss"] == pytest.approx(sum(s for s, _ in one) / sum(c for _, c in one), rel=1e-4)
    assert total["perplexity"] == pytest.approx(math.exp(total["loss"]))


def test_eval_defaults_to_the_runs_eval_split_and_matches_trainings_heldout_loss(loaded, tiny_run, small_regression):
    report = evaluate(tiny_run, regression=[small_regression], settings=EvalSettings(max_new_tokens=8), inference=loaded, progress=False)
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    loss = report.task["metrics"]["loss"]
    assert report.task["rows"] == 8 and report.task["sources"] == [manifest["data"]["sources"][1]["path"]]
    assert loss["adapter"] == pytest.approx(manifest["metrics"]["heldout"]["adapter"]["loss"], rel=1e-4)
    assert loss["base"] == pytest.approx(manifest["metrics"]["heldout"]["base"]["loss"], rel=1e-4)
    assert loss["delta"] < -1.0, "the adapter learned the copy task"
    metrics = report.task["metrics"]
    assert {"exact_match", "contains", "rouge_l", "stops", "mean_new_tokens"} <= set(metrics)
    assert "json_valid" not in metrics, "no reference is JSON"
    assert metrics["exact_match"]["adapter"] > metrics["exact_match"]["base"]
    r = report.regression
    assert r["rows"] == 6 and r["wins"] + r["losses"] + r["ties"] == 6
    assert r["mean_delta"] == pytest.approx(sum(r["deltas"]) / 6)


def test_report_files_are_written_together_into_a_new_folder_only(loaded, tiny_run, small_regression, tmp_path):
    report = evaluate(tiny_run, regression=[small_regression], settings=EvalSettings(max_new_tokens=6), inference=loaded, progress=False)
    out = report.write(tmp_path / "eval")
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "report.png"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["task"]["metrics"]["loss"]["adapter"] == report.task["metrics"]["loss"]["adapter"]
    assert saved["gates"]["exit_code"] == report.exit_code
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| loss |" in (out / "report.md").read_text()
    with pytest.raises(LoraftError, match="already exists"):  # eval's --out rule is merge's and export's: never replaced
        report.write(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]
    assert json.loads((out / "report.json").read_text()) == saved


def test_min_threshold_and_regression_gates_decide_the_exit_code(loaded, tiny_run, small_regression):
    passing = evaluate(tiny_run, regression=[small_regression], settings=EvalSettings(max_new_tokens=6),
                       gates=Gates({"stops": 0.0}, max_regression=100.0), inference=loaded, progress=False)
    assert passing.passed and passing.exit_code == 0
    failing = evaluate(tiny_run, regression=[small_regression], settings=EvalSettings(max_new_tokens=6),
                       gates=Gates({"exact_match": 1.01, "json_valid": 0.5}, max_regression=-100.0), inference=loaded, progress=False)
    assert failing.exit_code == EXIT_GATE == 3
    assert [f.split(" ")[0] for f in failing.failures] == ["exact_match", "--min-json-valid", "regression:"]


def test_eval_cli_prints_the_table_writes_the_report_and_exits_3_on_a_failed_gate(tiny_run, small_regression, tmp_path, run_cli):
    out = tmp_path / "report"
    code, stdout, _ = run_cli("eval", "--adapter", tiny_run, "--regression", small_regression, "--max-new-tokens", "6",
                              "--min-exact-match", "1.01", "--out", out)
    assert code == 3
    assert "metric" in stdout and "exact_match" in stdout and "GATE FAILED: exact_match" in stdout
    assert (out / "report.json").is_file()
    code, stdout, stderr = run_cli("eval", "--adapter", tiny_run, "--no-regression", "--max-new-tokens", "4", "--min-stops", "0")
    assert code == 0 and "regression set" not in stdout
    assert "gates passed: stops >= 0" in stdout and "regression" not in stdout.split("gates passed")[1]
    assert "task: loss" not in stderr  # stage lines are for a terminal; piped, stderr holds errors only


def test_eval_shows_a_line_per_stage_on_a_terminal(loaded, tiny_run):
    import io

    from rich.console import Console

    screen = io.StringIO()
    evaluate(tiny_run, regression=[], settings=EvalSettings(max_new_tokens=2), inference=loaded,
             progress=Console(file=screen, force_terminal=True, width=200))
    assert "task: loss of base and adapter on" in screen.getvalue()


def test_eval_refuses_an_existing_out_before_loading_anything(tiny_run, tmp_path, run_cli):
    out = tmp_path / "report"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, stdout, stderr = run_cli("eval", "--adapter", tiny_run, "--out", out)
    assert code == 2 and "--out:" in stderr and "already exists" in stderr and stdout == ""
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_eval_refuses_a_wrong_base_with_exit_2_and_writes_nothing(tiny_run, other_tiny_model_dir, tmp_path, run_cli):
    out = tmp_path / "report"
    code, _, stderr = run_cli("eval", "--adapter", tiny_run, "--base", other_tiny_model_dir, "--out", out)
    assert code == 2 and "is not the model this adapter was trained on" in stderr
    assert not out.exists()


def test_eval_without_eval_data_asks_for_data(tiny_config, run_cli, tmp_path):
    del tiny_config["data"]["eval"]
    tiny_config["training"]["max_steps"] = 2
    run = train(validate_dict(tiny_config)).run_dir
    code, _, stderr = run_cli("eval", "--adapter", run, "--no-regression")
    assert code == 2 and "has no eval data" in stderr and "--data FILE" in stderr


def test_eval_fraction_runs_are_evaluated_on_the_same_held_out_rows(tiny_config, tmp_path):
    del tiny_config["data"]["eval"]
    tiny_config["data"]["eval_fraction"] = 0.25
    tiny_config["training"]["max_steps"] = 4
    run = train(validate_dict(tiny_config)).run_dir
    manifest = json.loads((run / "manifest.json").read_text())
    report = evaluate(run, regression=[], settings=EvalSettings(max_new_tokens=2), progress=False)
    assert report.task["rows"] == 8 == manifest["metrics"]["heldout"]["adapter"]["rows"]
    assert report.task["metrics"]["loss"]["adapter"] == pytest.approx(manifest["metrics"]["heldout"]["adapter"]["loss"], rel=1e-4)


# ---------------------------------------------------------------------------------------------
# Evaluation during training


def test_eval_steps_log_eval_loss_and_early_stopping_keeps_the_best_adapter(tiny_config, tmp_path):
    # Eval rows answer the opposite of what training teaches, so eval loss rises after a few steps.
    wrong = [{"prompt": r["prompt"], "completion": "maybe maybe maybe"} for r in copy_rows(8)]
    tiny_config["data"]["eval"] = str(write_jsonl(tmp_path / "wrong_eval.jsonl", wrong))
    tiny_config["training"].update(max_steps=60, eval_steps=3, early_stopping_patience=2, logging_steps=3)
    result = train(validate_dict(tiny_config))
    history = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    assert [s for s, _ in evals] == list(range(3, 3 * len(evals) + 1, 3))
    steps = result.manifest.metrics.steps
    assert steps < 60, "early stopping ended the run"
    best = min(loss for _, loss in evals)
    assert [loss for _, loss in evals][-3] == best, "stopped exactly `patience` evaluations after the best one"
    # load_best_model_at_end: the saved adapter is the best checkpoint, not the last step's
    assert result.scores["adapter"]["loss"] == pytest.approx(best, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# On the real quickstart model (SmolLM2-135M-Instruct): a useful adapter vs a damaging one


@pytest.fixture(scope="module")
def quickstart_pair(tmp_path_factory, quickstart_gguf):
    """Two short runs on the quickstart task: a useful adapter, and one wrecked by a huge learning rate."""
    from pathlib import Path

    root = tmp_path_factory.mktemp("quickstart_eval")
    recipes = Path(__file__).resolve().parents[1] / "recipes" / "data"
    train_rows = [json.loads(line) for line in (recipes / "quickstart_train.jsonl").read_text().splitlines()][:48]
    eval_rows = [json.loads(line) for line in (recipes / "quickstart_eval.jsonl").read_text().splitlines()][:6]
    regression_rows = [json.loads(line) for line in DEFAULT_REGRESSION.read_text().splitlines()][:10]
    data = {"train": str(write_jsonl(root / "train.jsonl", train_rows)), "eval": str(write_jsonl(root / "eval.jsonl", eval_rows))}

    def run(name: str, steps: int, lr: float, batch: int):
        cfg = {
            "model": {"name": str(quickstart_gguf)},
            "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
            "data": data,
            "training": {"max_steps": steps, "batch_size": batch, "learning_rate": lr, "lr_scheduler": "constant",
                         "warmup_ratio": 0.0, "max_seq_length": 128, "precision": "fp32", "gradient_checkpointing": False,
                         "logging_steps": 2},
            "output_dir": str(root / name),
        }
        return train(validate_dict(cfg)).run_dir

    from lora_ft.serving.inference import load_for_inference

    good, bad = run("good", 10, 2e-3, 4), run("bad", 3, 0.5, 2)
    inference = load_for_inference([good, bad])  # one base in memory, both adapters on it
    return good, bad, inference, write_jsonl(root / "regression.jsonl", regression_rows)


@pytest.mark.slow
def test_quickstart_adapter_beats_base_on_its_task_and_passes_the_regression_gate(quickstart_pair):
    good, _, inference, regression = quickstart_pair
    report = evaluate(good, regression=[regression], inference=inference, progress=False)
    m = report.task["metrics"]
    # Measured (CPU, this config): base json_fields 0.00, adapter 0.75 (three fields right, the time still off);
    # json_valid 0.00 -> 1.00; stops 0.17 -> 1.00; loss 1.36 -> 0.12. Thresholds leave room for float noise.
    assert m["json_fields"]["adapter"] >= 0.6 and m["json_fields"]["base"] <= 0.2
    assert m["json_valid"]["adapter"] == 1.0 > m["json_valid"]["base"]
    assert m["rouge_l"]["adapter"] > m["rouge_l"]["base"] + 0.5
    assert m["stops"]["adapter"] == 1.0 > m["stops"]["base"], "every answer ends with <|im_end|> before the length limit"
    assert m["loss"]["adapter"] < m["loss"]["base"] / 3
    assert report.passed, report.failures
    assert report.regression["losses"] == 0 and report.regression["mean_delta"] < 0.25


@pytest.mark.slow
def test_regression_set_flags_an_adapter_trained_with_a_huge_learning_rate(quickstart_pair):
    _, bad, inference, regression = quickstart_pair
    report = evaluate(bad, regression=[regression], inference=inference, progress=False)
    r = report.regression
    assert r["mean_delta"] > 1.0 and r["losses"] >= 8
    assert r["metrics"]["contains"]["base"] >= 0.9 > r["metrics"]["contains"]["adapter"]
    assert report.exit_code == EXIT_GATE and report.failures[0].startswith("regression:")
    worst = r["worst"][0]
    assert worst["delta"] == max(r["deltas"]) and worst["prompt"] and worst["base_output"] and "adapter_output" in worst
