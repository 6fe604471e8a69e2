"""loraft data check: each planted problem is found with the right count, clean data reports none,
--fix and --report write what they promise, and a failing check stops `loraft train` before the model loads."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re

import pytest
import yaml

from conftest import write_jsonl
from lora_ft.config_io import validate_dict
from lora_ft.data_check import check_data, normalise
from lora_ft.errors import DataError
from lora_ft.data.near_dup import bands_for, near_duplicate_pairs, near_matches

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "po", "si", "de", "vu", "ga", "hi"]
MAX_LEN = 512  # a clean row renders to ~210 tokens with the tiny tokenizer


def vocabulary(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return sorted({"".join(rng.choice(SYLLABLES) for _ in range(3)) for _ in range(400)})


def clean_rows(n: int, seed: int = 0, prompt_words: int = 30, answer_words: int = 5) -> list[dict]:
    """Rows of random words: no two alike, so any finding comes from what a test plants."""
    rng, words = random.Random(seed), vocabulary()
    return [
        {"prompt": " ".join(rng.choices(words, k=prompt_words)), "completion": " ".join(rng.choices(words, k=answer_words))}
        for _ in range(n)
    ]


def one_word_changed(row: dict, seed: int) -> dict:
    words = row["prompt"].split()
    words[len(words) // 2] = "zzzqx" + str(seed)  # one of 30+5 words: bigram Jaccard 32/36 = 0.89
    return {"prompt": " ".join(words), "completion": row["completion"]}


@pytest.fixture
def make_config(tmp_path, tiny_model_dir):
    """Write train (and eval) rows and return a validated config for the tiny model."""

    def _make(train: list[dict], evaluation: list[dict] | None = None, checks: dict | None = None, **data):
        raw = {
            "model": {"name": str(tiny_model_dir)},
            "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", train)), "checks": checks or {}, **data},
            "training": {"max_seq_length": MAX_LEN, "max_steps": 2, "batch_size": 4, "precision": "fp32"},
            "output_dir": str(tmp_path / "run"),
        }
        if evaluation is not None:
            raw["data"]["eval"] = str(write_jsonl(tmp_path / "eval.jsonl", evaluation))
        return raw

    return _make


def findings(result) -> dict[str, int]:
    return {f"{f.split}:{f.name}": f.count for f in result.findings}


# ---------------------------------------------------------------------------------------------
# Each check on planted problems


def test_clean_data_reports_no_finding(make_config):
    result = check_data(validate_dict(make_config(clean_rows(40), clean_rows(10, seed=1))))
    assert result.findings == () and not result.failed
    train, evaluation = result.splits
    assert (train.rows, evaluation.rows, train.bad_rows) == (40, 10, 0)
    assert 150 < train.tokens["min"] <= train.tokens["median"] <= train.tokens["p95"] <= train.tokens["max"] < MAX_LEN
    assert train.answers is None  # five-word answers are not a label set


def test_exact_duplicates_are_counted_after_normalising_case_space_and_punctuation(make_config):
    rows = clean_rows(30)
    copies = [
        {"prompt": rows[3]["prompt"].upper(), "completion": rows[3]["completion"]},
        {"prompt": "  " + rows[5]["prompt"].replace(" ", "  ,") + " !", "completion": rows[5]["completion"] + "."},
        dict(rows[3]),
    ]
    result = check_data(validate_dict(make_config(rows + copies)))
    assert findings(result) == {"train:exact_duplicates": 3}
    kept = {item["same_as"] for item in result.findings[0].examples}
    assert kept == {f"{rows_path(result)}:4", f"{rows_path(result)}:6"}
    assert normalise("  Hello,   WORLD!! ") == "hello world"


def rows_path(result) -> str:
    return result.fix.splits[0].rows[0].where.rsplit(":", 1)[0]


def test_near_duplicates_are_found_at_the_threshold_and_not_above_it(make_config):
    rows = clean_rows(30)
    planted = [one_word_changed(rows[2], 1), one_word_changed(rows[9], 2)]
    result = check_data(validate_dict(make_config(rows + planted)))
    assert findings(result) == {"train:near_duplicates": 2}
    assert [e["jaccard"] for e in result.findings[0].examples] == [pytest.approx(32 / 36, abs=1e-3)] * 2
    strict = check_data(validate_dict(make_config(rows + planted, checks={"near_duplicate_threshold": 0.95})))
    assert strict.findings == ()


def test_contradictions_count_prompts_with_different_answers(make_config):
    rows = clean_rows(30)
    other = clean_rows(2, seed=7)
    planted = [
        {"prompt": rows[0]["prompt"], "completion": other[0]["completion"]},
        {"prompt": rows[1]["prompt"] + "?", "completion": other[1]["completion"]},
    ]
    result = check_data(validate_dict(make_config(rows + planted)))
    assert findings(result) == {"train:conflicting_answers": 2}
    assert "4 rows involved" in result.findings[0].message


def test_an_eval_row_contradicting_train_is_found_across_splits(make_config):
    train = clean_rows(30)
    evaluation = clean_rows(5, seed=1) + [{"prompt": train[6]["prompt"], "completion": clean_rows(1, seed=8)[0]["completion"]}]
    result = check_data(validate_dict(make_config(train, evaluation)))
    assert findings(result) == {"train+eval:conflicting_answers": 1}  # Jaccard 29/39 = 0.74: not a leak
    assert result.findings[0].examples[0]["where"].endswith("train.jsonl:7")


def test_exact_leakage_fails_and_near_leakage_warns_by_default(make_config):
    train = clean_rows(40)
    evaluation = clean_rows(10, seed=1) + [dict(train[4]), dict(train[8]), one_word_changed(train[20], 3)]
    result = check_data(validate_dict(make_config(train, evaluation)))
    assert findings(result) == {"train+eval:eval_rows_in_train": 2, "train+eval:eval_rows_near_train": 1}
    exact, near = result.findings
    assert (exact.check, exact.level, near.check, near.level) == ("leakage", "fail", "near_leakage", "warn")
    assert result.failed
    (pair,) = near.examples
    assert pair["where"].endswith("eval.jsonl:13") and pair["in_train"].endswith("train.jsonl:21")
    assert pair["jaccard"] == pytest.approx(32 / 36, abs=1e-3)
    assert pair["train_text"] == train[20]["prompt"][:97] + "..."  # the closest train row, as written
    overlap = result.overlap
    assert (overlap.eval_rows, overlap.exact, overlap.near) == (13, 2, 1)


NAMES, ANIMALS = ["Tom", "Lily", "Sam", "Mia", "Ben", "Zoe"], ["cat", "dog", "frog", "bird", "fox", "bear"]
PLACES, THINGS = ["forest", "garden", "castle", "river", "village"], ["ball", "key", "hat", "box", "kite"]


def templated_stories(n: int, seed: int = 0) -> list[dict]:
    """The issue's templated task: one story template, different slot values, no combination twice."""
    combos = list(itertools.product(NAMES, ANIMALS, PLACES, THINGS))
    random.Random(seed).shuffle(combos)
    return [
        {"prompt": f"Write a short story about {name} the {animal} who finds a {thing} in the {place}.",
         "completion": f"Once upon a time, {name} the {animal} went to the {place}. There {name} found a {thing}. "
                       f"{name} was very happy with the {thing} and took it home. The end."}
        for name, animal, place, thing in combos[:n]
    ]


@pytest.fixture
def templated_config(make_config, write_yaml):
    """40 train rows and 10 held-out rows, all new combinations: 6 of the 10 are within one slot of a train row
    (word-bigram Jaccard 0.857), none is in train."""
    rows = templated_stories(50)
    return write_yaml(make_config(rows[:40], rows[40:]))


def test_a_templated_task_of_new_combinations_passes_data_check_with_a_near_leakage_warning(templated_config, run_cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one finding, one line
    code, out, err = run_cli("data", "check", templated_config)
    assert code == 0, err
    assert "WARN near_leakage/eval_rows_near_train (train+eval): 6 eval rows are near copies of a train row" in out
    assert "leakage/eval_rows_in_train" not in out
    assert re.search(r"eval\.jsonl:\d+ ~ \S+train\.jsonl:\d+ \(Jaccard 0\.86\)  eval: Write a short story", out)


def test_report_lists_every_flagged_eval_row_beside_its_closest_train_row(templated_config, run_cli, tmp_path):
    code, _, _ = run_cli("data", "check", templated_config, "--report", tmp_path / "report")
    assert code == 0
    overlap = json.loads((tmp_path / "report" / "data_report.json").read_text())["heldout_overlap"]
    assert {k: v for k, v in overlap.items() if k != "pairs"} == {
        "eval_rows": 10, "exact_copies_in_train": 0, "near_copies_in_train": 6, "near_threshold": 0.8}
    train = [json.loads(line) for line in open(tmp_path / "train.jsonl")]
    evaluation = [json.loads(line) for line in open(tmp_path / "eval.jsonl")]
    for pair in overlap["pairs"]:
        row = evaluation[int(pair["where"].rsplit(":", 1)[1]) - 1]
        similarities = [bigram_jaccard(row, other) for other in train]
        # the train row shown is the most similar one, and the similarity is the exact Jaccard
        assert pair["jaccard"] == pytest.approx(max(similarities), abs=1e-3) == pytest.approx(6 / 7, abs=1e-3)
        assert bigram_jaccard(row, train[int(pair["in_train"].rsplit(":", 1)[1]) - 1]) == max(similarities)
    markdown = (tmp_path / "report" / "data_report.md").read_text()
    assert "## Eval rows with a copy in train" in markdown and markdown.count("| 0.857 |") == 6


def bigram_jaccard(a: dict, b: dict) -> float:
    def bigrams(row):
        words = normalise(row["prompt"] + " " + row["completion"]).split()
        return set(zip(words, words[1:]))

    return len(bigrams(a) & bigrams(b)) / len(bigrams(a) | bigrams(b))


def test_train_on_a_templated_task_is_not_refused_and_states_the_near_copies_as_a_caveat(templated_config, run_cli, tmp_path):
    code, out, err = run_cli("train", templated_config, "--set", "training.max_steps=1")
    assert code == 0, err
    assert "warning: data check near_leakage (train+eval): 6 eval rows are near copies" in err
    assert "caveat          6 of 10 held-out rows have a copy in train (6 nearly (Jaccard >= 0.8))" in out
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["data"]["heldout_overlap"] == {
        "eval_rows": 10, "exact_copies_in_train": 0, "near_copies_in_train": 6, "near_threshold": 0.8}


def test_near_leakage_can_be_made_to_fail_or_turned_off(make_config):
    train = clean_rows(40)
    evaluation = clean_rows(10, seed=1) + [one_word_changed(train[20], 3)]
    strict = check_data(validate_dict(make_config(train, evaluation, checks={"near_leakage": "fail"})))
    assert strict.failed and "set data.checks.near_leakage: warn" in strict.failure_line()
    off = check_data(validate_dict(make_config(train, evaluation, checks={"near_leakage": "off"})))
    assert off.findings == () and (off.overlap.exact, off.overlap.near) == (0, None)


def test_tool_calls_count_in_what_makes_rows_alike_and_the_shared_tool_list_does_not(make_config):
    def tool_row(city: str, tools: list[dict]) -> dict:
        call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
        return {"tools": tools, "messages": [
            {"role": "user", "content": "What is the weather where I am going?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."}]}

    tools = [{"type": "function", "function": {"name": "get_weather", "description": " ".join(vocabulary()[:60])}}]
    rows = [tool_row(city, tools) for city in ("Paris", "Rome", "Paris")]
    rows += [{"tools": tools, "messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
             for r in clean_rows(20)]
    result = check_data(validate_dict(make_config(rows, checks={"chat_fields": "off"})))
    # Paris twice is an exact duplicate, Rome (another call) a near one; the 60-word tool list shared by all makes no pair.
    assert findings(result) == {"train:exact_duplicates": 1, "train:near_duplicates": 1}
    (near,) = result.findings[1].examples
    assert near["where"].endswith("train.jsonl:2") and near["like"].endswith("train.jsonl:1")


def test_over_long_rows_report_whether_truncation_cuts_the_completion(make_config):
    rows = clean_rows(30)
    long_prompts = clean_rows(2, seed=3, prompt_words=120)  # the prompt alone passes max_seq_length
    long_answer = clean_rows(1, seed=4, prompt_words=30, answer_words=80)  # the cut falls inside the answer
    result = check_data(validate_dict(make_config(rows + long_prompts + long_answer)))
    assert findings(result) == {"train:too_long": 3, "train:no_trained_tokens": 2}
    too_long = result.findings[0]
    assert "cut away entirely in 2, partly in 1" in too_long.message
    assert all(item["tokens"] > MAX_LEN for item in too_long.examples)


def test_forked_workers_give_the_same_token_counts_as_one_process(make_config, monkeypatch):
    import lora_ft.data.prepared as prepared

    rows = clean_rows(30) + clean_rows(2, seed=3, prompt_words=120) + [{"prompt": "x", "completion": ""}]
    cfg = validate_dict(make_config(rows))
    serial = check_data(cfg)
    monkeypatch.setattr(prepared, "PARALLEL_MIN_ROWS", 0)
    monkeypatch.setattr(prepared, "CHUNK_ROWS", 7)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # two workers even on a one-core runner
    forked = check_data(cfg)
    assert forked.splits == serial.splits and forked.findings == serial.findings
    assert findings(forked) == {"train:too_long": 2, "train:empty_completion": 1, "train:no_trained_tokens": 2}


def test_empty_completion_is_reported_but_still_trains_the_end_of_turn_token(make_config):
    rows = clean_rows(30) + [{"prompt": "say nothing at all please", "completion": ""}]
    result = check_data(validate_dict(make_config(rows)))
    assert findings(result) == {"train:empty_completion": 1}


def test_fully_masked_rows_are_found_when_no_label_survives(make_config):
    # train_on last_assistant with a chat whose only assistant turn lies beyond max_seq_length.
    long_user = " ".join(vocabulary()[:200])
    rows = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in clean_rows(20)]
    rows.append({"messages": [{"role": "user", "content": long_user}, {"role": "assistant", "content": "ok"}]})
    result = check_data(validate_dict(make_config(rows, train_on="last_assistant")))
    assert findings(result) == {"train:too_long": 1, "train:no_trained_tokens": 1}


def test_dominant_label_is_flagged_and_a_balanced_label_set_is_not(make_config):
    prompts = clean_rows(30)
    skewed = [{"prompt": r["prompt"], "completion": "positive" if i < 25 else "negative"} for i, r in enumerate(prompts)]
    result = check_data(validate_dict(make_config(skewed)))
    assert findings(result) == {"train:dominant_answer": 1}
    assert result.splits[0].answers == {"positive": 25, "negative": 5}
    assert "83%" in result.findings[0].message
    balanced = [{"prompt": r["prompt"], "completion": ["positive", "negative"][i % 2]} for i, r in enumerate(prompts)]
    assert check_data(validate_dict(make_config(balanced))).findings == ()


def test_every_malformed_row_is_listed_with_file_and_line(make_config, tmp_path):
    good = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in clean_rows(6)]
    bad = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]},
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "c"}]},
        {"messages": []},
    ]
    result = check_data(validate_dict(make_config(good[:3] + bad[:2] + good[3:] + bad[2:])))
    assert findings(result) == {"train:malformed_rows": 4}
    lines = [item["where"].rsplit(":", 1)[1] for item in result.findings[0].examples]
    assert lines == ["4", "5", "9", "10"]
    assert "role 'wizard'" in result.findings[0].examples[0]["error"]
    assert result.failed  # row_schema always fails: training could not use these rows
    fixed = result.write_fix(tmp_path / "clean")
    assert fixed.kept == {"train": 6} and fixed.removed == {"train": 4}
    removed = [json.loads(line) for line in (tmp_path / "clean" / "removed.jsonl").read_text().splitlines()]
    assert removed[1]["reason"] == "malformed: two user messages in a row; user and assistant turns must alternate"


def test_checks_survive_the_redacted_config_the_run_folder_keeps(make_config):
    from lora_ft.config_io import config_to_yaml

    checks = {"lengths": "fail", "duplicates": "off", "leakage": "warn", "near_duplicate_threshold": 0.9}
    cfg = validate_dict(make_config(clean_rows(3), checks=checks))
    reread = validate_dict(yaml.safe_load(config_to_yaml(cfg)))
    assert reread.data.checks == cfg.data.checks and reread.data.checks.lengths == "fail"


def test_off_turns_a_check_off(make_config):
    rows = clean_rows(20)
    result = check_data(validate_dict(make_config(rows + [dict(rows[0])], checks={"duplicates": "off"})))
    assert result.findings == ()


# ---------------------------------------------------------------------------------------------
# Near-duplicate search


def test_near_duplicate_search_finds_planted_pairs_among_thousands_without_false_ones():
    rows = clean_rows(3000, seed=11)
    texts = [normalise(r["prompt"] + " " + r["completion"]) for r in rows]
    planted = {3000 + k: 97 * k for k in range(25)}
    texts += [normalise(" ".join(one_word_changed(rows[src], k).values())) for k, src in enumerate(planted.values())]
    pairs = near_duplicate_pairs(texts, 0.8)
    assert {dup: kept for dup, kept, _ in pairs} == planted
    assert all(0.8 <= similarity < 1 for _, _, similarity in pairs)


def test_near_matches_map_queries_to_corpus_rows():
    corpus = [normalise(r["prompt"]) for r in clean_rows(200, seed=5)]
    queries = [corpus[10], normalise(one_word_changed({"prompt": corpus[50], "completion": ""}, 1)["prompt"]), "nothing like it"]
    found = near_matches(queries, corpus, 0.8)
    assert found[0] == (10, 1.0) and found[1][0] == 50 and 2 not in found


def test_near_duplicate_search_handles_empty_and_one_word_rows():
    texts = ["", "hello", "", "alpha beta gamma delta", "hello", "alpha beta gamma delta epsilon", ""]
    # 3 of 4 bigrams shared: Jaccard 0.75 passes 0.7; "hello" is one shingle; empty rows never match.
    assert near_duplicate_pairs(texts, 0.7) == [(4, 1, 1.0), (5, 3, 0.75)]


def test_banding_finds_pairs_at_the_threshold_with_high_probability():
    for threshold in (0.5, 0.8, 0.9):
        bands, rows = bands_for(threshold)
        assert bands * rows <= 128
        assert 1 - (1 - threshold**rows) ** bands >= 0.995


# ---------------------------------------------------------------------------------------------
# The CLI: exit codes, --report, --fix, malformed files


def test_cli_exits_2_when_a_fail_check_fires_and_0_when_it_is_set_to_warn(make_config, write_yaml, run_cli):
    train = clean_rows(20)
    config = write_yaml(make_config(train, [dict(train[0])] + clean_rows(3, seed=2)))
    code, out, err = run_cli("data", "check", config)
    assert code == 2
    assert "FAIL leakage/eval_rows_in_train" in out
    assert err.count("\n") == 1 and "loraft data check" in err and "data.checks.leakage: warn" in err
    code, out, _ = run_cli("data", "check", config, "--set", "data.checks.leakage=warn")
    assert code == 0 and "WARN leakage" in out


def test_report_writes_json_and_markdown_with_the_findings(make_config, write_yaml, run_cli, tmp_path):
    rows = clean_rows(20)
    config = write_yaml(make_config(rows + [dict(rows[1]), dict(rows[2])]))
    code, _, _ = run_cli("data", "check", config, "--report", tmp_path / "report")
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["data_report.json", "data_report.md"]
    report = json.loads((tmp_path / "report" / "data_report.json").read_text())
    assert report["ok"] is True and report["splits"][0]["rows"] == 22
    assert [(f["name"], f["count"], f["level"]) for f in report["findings"]] == [("exact_duplicates", 2, "warn")]
    assert "### WARN duplicates: exact_duplicates (train)" in (tmp_path / "report" / "data_report.md").read_text()


def test_fix_writes_cleaned_copies_and_leaves_the_originals_alone(make_config, write_yaml, run_cli, tmp_path):
    train = clean_rows(30)
    other = clean_rows(1, seed=9)
    train_rows = train + [dict(train[0]), one_word_changed(train[1], 1), {"prompt": train[2]["prompt"], "completion": other[0]["completion"]}]
    eval_rows = clean_rows(5, seed=1) + [dict(train[3]), one_word_changed(train[4], 2)]
    raw = make_config(train_rows, eval_rows)
    config = write_yaml(raw)
    before = {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in (raw["data"]["train"], raw["data"]["eval"])}

    code, out, _ = run_cli("data", "check", config, "--fix", tmp_path / "clean")
    assert code == 2  # the leak in the original data still fails the check
    fixed = tmp_path / "clean"
    assert sorted(p.name for p in fixed.iterdir()) == [
        "contradictions.jsonl", "data_config.yaml", "eval.jsonl", "removed.jsonl", "train.jsonl"]
    kept_train = [json.loads(line) for line in (fixed / "train.jsonl").read_text().splitlines()]
    kept_eval = [json.loads(line) for line in (fixed / "eval.jsonl").read_text().splitlines()]
    assert kept_train == train_rows[:30] + train_rows[32:]  # the duplicate and near-duplicate are gone
    assert kept_eval == eval_rows[:5]  # both leaked rows are gone
    removed = [json.loads(line) for line in (fixed / "removed.jsonl").read_text().splitlines()]
    assert [(r["split"], r["where"].rsplit(":", 1)[1]) for r in removed] == [("train", "31"), ("train", "32"), ("eval", "6"), ("eval", "7")]
    assert removed[0]["reason"].startswith("exact duplicate of") and "Jaccard" in removed[1]["reason"]
    (group,) = [json.loads(line) for line in (fixed / "contradictions.jsonl").read_text().splitlines()]
    assert [a["answer"] for a in group["answers"]] == [train[2]["completion"], other[0]["completion"]]
    assert yaml.safe_load((fixed / "data_config.yaml").read_text())["data"]["eval"] == str(fixed / "eval.jsonl")
    assert before == {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in before}

    code, out, _ = run_cli("data", "check", config, "--set", f"data.train={fixed / 'train.jsonl'}",
                           "--set", f"data.eval={fixed / 'eval.jsonl'}")
    assert code == 0
    assert "duplicates" not in out and "leakage" not in out and "contradictions/conflicting_answers (train)" in out


def test_fix_refuses_an_existing_folder(make_config, write_yaml, run_cli, tmp_path):
    (tmp_path / "clean").mkdir()
    code, _, err = run_cli("data", "check", write_yaml(make_config(clean_rows(10))), "--fix", tmp_path / "clean")
    assert code == 2 and "already exists" in err


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("broken.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n', "broken.jsonl:2: not valid JSON"),
        ("latin1.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n', "latin1.jsonl:2: not UTF-8"),
        ("ragged.csv", b"prompt,completion\na,b\nc,d,e\n", "ragged.csv:3: 3 fields where the header has 2"),
        ("empty.jsonl", b"", "empty.jsonl: no rows"),
    ],
)
def test_malformed_files_give_one_line_naming_file_and_line(name, content, expected, write_yaml, run_cli, tmp_path, tiny_model_dir):
    (tmp_path / name).write_bytes(content)
    config = write_yaml({"model": {"name": str(tiny_model_dir)}, "data": {"train": str(tmp_path / name)}})
    code, out, err = run_cli("data", "check", config)
    assert code == 2
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1
    assert "Traceback" not in out + err


# ---------------------------------------------------------------------------------------------
# The gate inside `loraft train`


def test_train_with_a_failing_check_exits_2_before_the_model_loads_and_writes_nothing(
    make_config, write_yaml, run_cli, tmp_path, monkeypatch
):
    import lora_ft.training.fit

    def must_not_load(*args, **kwargs):
        raise AssertionError("the base model was loaded although the data check failed")

    monkeypatch.setattr(lora_ft.training.fit, "load_base_model", must_not_load)  # where train looks it up
    train = clean_rows(20)
    config = write_yaml(make_config(train, [dict(train[0]), dict(train[1])] + clean_rows(4, seed=2)))
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run_cli("train", config)
    assert code == 2
    assert "data check failed: leakage: 2 eval rows also appear in train" in err and "loraft data check" in err
    assert not (tmp_path / "run").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_train_prints_warnings_and_goes_on(tiny_config, capsys):
    from rich.console import Console

    from lora_ft.data_check import gate_data
    from lora_ft.model.loading import load_tokenizer, resolve_model_source

    cfg = validate_dict(tiny_config)
    console = Console(file=None, stderr=True, width=200)
    result = gate_data(cfg, load_tokenizer(cfg.model, resolve_model_source(cfg.model)), console)
    err = capsys.readouterr().err
    assert not result.failed
    assert "warning: data check duplicates (train): 24 rows repeat an earlier row" in err
    assert "warning: data check leakage (train+eval): 8 eval rows also appear in train" in err


def test_gate_raises_one_line_data_error(make_config):
    train = clean_rows(10)
    cfg = validate_dict(make_config(train, [dict(train[0])]))
    with pytest.raises(DataError) as info:
        from rich.console import Console

        from lora_ft.data_check import gate_data
        from lora_ft.model.loading import load_tokenizer, resolve_model_source

        gate_data(cfg, load_tokenizer(cfg.model, resolve_model_source(cfg.model)), Console(quiet=True))
    assert "\n" not in str(info.value)


def test_a_template_that_never_ends_assistant_turns_fails_the_end_of_turn_check(tmp_path, tiny_config, write_yaml, run_cli):
    broken = tmp_path / "no_end.jinja"
    broken.write_text(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    tiny_config["model"]["chat_template"] = str(broken)
    code, out, err = run_cli("data", "check", write_yaml(tiny_config), "--report", tmp_path / "report")
    assert code == 2
    report = json.loads((tmp_path / "report" / "data_report.json").read_text())
    found = {(f["check"], f["name"]): f["count"] for f in report["findings"]}
    assert found[("end_of_turn", "no_end_of_turn_token")] == 32  # every assistant turn of the 32 train rows
    assert "no end-of-turn token" in err


def test_the_shipped_template_passes_the_end_of_turn_check(tmp_path, tiny_config, write_yaml, run_cli):
    code, out, err = run_cli("data", "check", write_yaml(tiny_config), "--report", tmp_path / "report")
    report = json.loads((tmp_path / "report" / "data_report.json").read_text())
    assert not [f for f in report["findings"] if f["check"] == "end_of_turn"]


def test_validate_runs_the_data_checks_train_runs(make_config, templated_config, write_yaml, run_cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    code, out, err = run_cli("validate", templated_config)
    assert code == 0, err
    assert "data check  data check passed with warnings" in out and "warn near_leakage (train+eval): 6 eval rows" in out
    train = clean_rows(20)
    code, out, err = run_cli("validate", write_yaml(make_config(train, [dict(train[0])] + clean_rows(3, seed=2)), "leaky.yaml"))
    assert code == 2 and "data check failed: leakage: 1 eval rows also appear in train" in err
