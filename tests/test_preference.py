"""Preference tuning (training.method dpo | kto): config rules that fail before a model loads, pairs rendered
through the SFT conversation format, the pair checks with counts and file:line, and DPO/KTO runs through
`loraft train` that move held-out preference accuracy, log the preference figures and record the chain."""

from __future__ import annotations

import json
import random
import re

import pytest
import yaml

from conftest import write_jsonl
from lora_ft.config_io import validate_dict
from lora_ft.data.pairs import answer_ids, encode_pair, read_pairs
from lora_ft.data_check import check_data
from lora_ft.errors import ConfigError

WORDS = ["yes", "no", "maybe", "fox", "dog", "paris", "hello", "world"]


def repeat_pairs(n: int, offset: int = 0, shift: int = 3) -> list[dict]:
    """Chosen repeats the word; rejected is another word of the same length class (no length bias)."""
    return [{"prompt": f"Repeat after me: {WORDS[(i + offset) % 8]}", "chosen": WORDS[(i + offset) % 8],
             "rejected": WORDS[(i + offset + shift) % 8]} for i in range(n)]


def pref_config(tmp_path, model_dir, train_rows, eval_rows=None, *, method="dpo", checks=None, **training) -> dict:
    data = {"train": str(write_jsonl(tmp_path / "train.jsonl", train_rows)),
            "checks": {"length_bias": "off", "contradictions": "off", **(checks or {})}}
    if eval_rows is not None:
        data["eval"] = str(write_jsonl(tmp_path / "eval.jsonl", eval_rows))
    return {
        "model": {"name": str(model_dir)},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        "data": data,
        "training": {"method": method, "max_steps": 16, "batch_size": 8, "learning_rate": 3e-2, "max_seq_length": 64,
                     "logging_steps": 4, "precision": "fp32", "warmup_ratio": 0.0, **training},
        "output_dir": str(tmp_path / "run"),
    }


def findings(result) -> dict:
    return {f.name: f for f in result.findings}


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("update, key, fix", [
    ({"lora": {"init": "pissa"}}, "lora.init: pissa", "lora.init: default"),
    ({"lora": {"init": "olora"}}, "lora.init: olora", "not the original model"),
    ({"data": {"packing": True}}, "data.packing", "data.packing: false"),
    ({"data": {"train_on": "all"}}, "data.train_on: all", "remove data.train_on"),
    ({"preference": {"kto": {"beta": 0.2}}}, "preference.kto is set", "training.method: kto"),
    ({"training": {"method": "kto", "batch_size": 1}}, "training.batch_size 1", "2 or more"),
])
def test_impossible_preference_combinations_fail_naming_the_key_and_the_fix(tmp_path, tiny_model_dir, write_yaml, run_cli,
                                                                            update, key, fix):
    cfg = pref_config(tmp_path, tiny_model_dir, repeat_pairs(8))
    for section, values in update.items():
        cfg.setdefault(section, {}).update(values)
    code, out, err = run_cli("validate", write_yaml(cfg))
    assert code == 2
    assert key in err and fix in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_preference_keys_with_sft_and_adapter_with_sft_are_refused():
    base = {"model": {"name": "m"}}
    with pytest.raises(ConfigError, match="preference.dpo is set but training.method is sft"):
        validate_dict({**base, "preference": {"dpo": {"beta": 0.5}}})
    with pytest.raises(ConfigError, match="model.adapter .* needs training.method"):
        validate_dict({"model": {"name": "m", "adapter": "runs/sft"}})


def test_method_keys_are_typed_and_defaulted():
    cfg = validate_dict({"model": {"name": "m"}, "training": {"method": "dpo"}, "preference": {"dpo": {"beta": "0.5"}}})
    assert cfg.preference.dpo.beta == 0.5 and cfg.preference.dpo.loss_type == "sigmoid"
    assert cfg.preference.kto.desirable_weight == 1.0
    with pytest.raises(ConfigError, match="preference.dpo.loss_type"):
        validate_dict({"model": {"name": "m"}, "training": {"method": "dpo"}, "preference": {"dpo": {"loss_type": "nope"}}})


# ---------------------------------------------------------------------------------------------
# Data: pairs through the SFT conversation format


def test_chosen_tokens_are_the_sft_answer_tokens_rendered_with_the_prompt(tmp_path, tiny_model_dir):
    from lora_ft.data.rows import encode
    from lora_ft.model.loading import load_tokenizer, resolve_model_source

    cfg = validate_dict(pref_config(tmp_path, tiny_model_dir, repeat_pairs(2)))
    tokenizer = load_tokenizer(cfg.model, resolve_model_source(cfg.model))
    row = {"prompt": [{"role": "user", "content": "Repeat after me: fox"}], "chosen": [{"role": "assistant", "content": "fox"}],
           "rejected": "dog"}
    from lora_ft.data.rows import Row

    pair = read_pairs([Row(row, "t:1")], cfg.data, tokenizer, "pairs")[0]
    encoded = encode_pair(pair, tokenizer, max_seq_length=64, max_prompt_length=None)
    sft = encode(pair.chosen.example, tokenizer, train_on="assistant", max_seq_length=64)
    trained = [t for t in sft.labels if t != -100]
    assert encoded.chosen_ids == trained  # the answer and its end-of-turn token, exactly as SFT trains them
    assert tokenizer.decode(encoded.chosen_ids) == "fox<|im_end|>"
    assert tokenizer.decode(encoded.prompt_ids).endswith("<|im_start|>assistant\n")
    assert encoded.prompt_ids + encoded.rejected_ids == answer_ids(pair.rejected, tokenizer)[0]
    assert encoded.same_prompt


# ---------------------------------------------------------------------------------------------
# Pair checks


def test_pair_checks_count_each_planted_problem_with_file_and_line(tmp_path, tiny_model_dir):
    rows = repeat_pairs(8)
    rows[2] = {**rows[2], "rejected": rows[2]["chosen"]}  # identical
    rows[3] = {"prompt": "Say a sentence", "chosen": "the quick brown fox jumps", "rejected": "the quick brown fox jumped"}
    rows.append({"chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
                 "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]})
    rows.append({"prompt": "Repeat after me: yes", "chosen": "maybe", "rejected": "yes"})  # contradicts row 1 ... not quite
    rows.append({"prompt": "Repeat after me: yes", "chosen": "fox", "rejected": "yes"})
    rows[0] = {"prompt": "Repeat after me: yes", "chosen": "yes", "rejected": "fox"}  # fox/yes both ways: contradiction
    leaked = [rows[5]] + repeat_pairs(3, 5, shift=1)
    cfg = validate_dict(pref_config(tmp_path, tiny_model_dir, rows, leaked, checks={"contradictions": "warn"}))
    result = check_data(cfg)
    found = findings(result)
    assert found["chosen_equals_rejected"].count == 1 and found["chosen_equals_rejected"].level == "fail"
    assert found["chosen_equals_rejected"].examples[0]["where"].endswith("train.jsonl:3")
    assert found["chosen_near_rejected"].count == 1 and found["chosen_near_rejected"].level == "warn"
    assert found["chosen_near_rejected"].examples[0]["rejected"] == "the quick brown fox jumped"
    assert found["different_prompts"].count == 1 and found["different_prompts"].examples[0]["where"].endswith(":9")
    assert found["contradictory_preferences"].count == 1
    assert found["eval_pairs_in_train"].count == 1 and found["eval_pairs_in_train"].level == "fail"
    assert result.failed


def test_length_limits_that_empty_an_answer_fail_and_cuts_warn_with_the_share(tmp_path, tiny_model_dir):
    rows = repeat_pairs(8)
    rows[0] = {"prompt": "Repeat " * 60, "chosen": "yes", "rejected": "no"}  # the prompt alone fills 64 tokens
    rows[1] = {"prompt": "Repeat after me", "chosen": "yes " * 50, "rejected": "no"}  # chosen cut
    result = check_data(validate_dict(pref_config(tmp_path, tiny_model_dir, rows)))
    found = findings(result)
    assert found["answer_emptied"].count == 1 and found["answer_emptied"].level == "fail"
    assert found["answer_cut"].count == 1 and "(12%)" in found["answer_cut"].message
    assert found["answer_cut"].examples[0]["chosen"].split("/")[0] != found["answer_cut"].examples[0]["chosen"].split("/")[1]


def test_length_bias_reports_the_share_and_the_mean_ratio(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"Tell me about {w}", "chosen": f"{w} is a fine word to know", "rejected": w} for w in WORDS]
    result = check_data(validate_dict(pref_config(tmp_path, tiny_model_dir, rows, checks={"length_bias": "warn"})))
    bias = findings(result)["chosen_longer"]
    assert bias.count == 8 and bias.examples[0]["share"] == 1.0 and bias.examples[0]["mean_length_ratio"] > 2
    clean = check_data(validate_dict(pref_config(tmp_path, tiny_model_dir, repeat_pairs(8), checks={"length_bias": "warn"})))
    assert "chosen_longer" not in findings(clean)


def test_clean_pairs_have_no_finding_and_checks_can_be_turned_off(tmp_path, tiny_model_dir):
    assert check_data(validate_dict(pref_config(tmp_path, tiny_model_dir, repeat_pairs(8), repeat_pairs(4, 1, shift=1)))).findings == ()
    rows = repeat_pairs(8)
    rows[2] = {**rows[2], "rejected": rows[2]["chosen"]}
    off = check_data(validate_dict(pref_config(tmp_path, tiny_model_dir, rows, checks={"identical_pairs": "off"})))
    assert "chosen_equals_rejected" not in findings(off)


def test_data_check_cli_and_train_stop_on_identical_pairs_before_weights_load(tmp_path, tiny_model_dir, write_yaml, run_cli):
    rows = repeat_pairs(8)
    rows[4] = {**rows[4], "rejected": rows[4]["chosen"]}
    config = write_yaml(pref_config(tmp_path, tiny_model_dir, rows))
    code, out, err = run_cli("data", "check", config)
    assert code == 2 and "1 of 8 pairs have identical chosen and rejected" in out + err and "train.jsonl:5" in out + err
    code, out, err = run_cli("train", config)
    assert code == 2 and "identical_pairs" in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Training


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model_dir):
    """A DPO run through `loraft train` on the repeat task (chosen repeats the word), held-out pairs included."""
    from typer.testing import CliRunner

    from lora_ft.cli import app

    root = tmp_path_factory.mktemp("dpo")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(pref_config(root, tiny_model_dir, repeat_pairs(32), repeat_pairs(8, 1, shift=5))))
    result = CliRunner().invoke(app, ["train", str(config)], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return root, result


@pytest.mark.slow
def test_dpo_train_moves_heldout_preference_accuracy_and_logs_the_preference_figures(dpo_run):
    root, result = dpo_run
    manifest = json.loads((root / "run" / "manifest.json").read_text())
    pref = manifest["preference"]
    assert pref["method"] == "dpo" and pref["reference"] == "the base model (adapter disabled)"
    assert pref["heldout"]["adapter"]["accuracy"] >= 0.9 > pref["heldout"]["base"]["accuracy"]
    assert pref["heldout"]["adapter"]["mean_margin"] > pref["heldout"]["base"]["mean_margin"]
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "rewards/margins" in r]
    assert logged and {"rewards/accuracies", "logps/chosen", "logps/rejected"} <= set(logged[-1])
    assert logged[-1]["rewards/margins"] > logged[0]["rewards/margins"]
    assert "margin " in result.stderr and "pref_acc " in result.stderr and "logp_chosen " in result.stderr
    assert not (root / "run" / "ref").exists()  # the reference is the base with the adapter disabled, never saved
    assert "held-out accuracy base" in result.stdout + result.stderr


@pytest.mark.slow
def test_eval_reports_preference_accuracy_base_vs_adapter_and_gates_on_it(dpo_run, run_cli):
    root, _ = dpo_run
    code, out, err = run_cli("eval", "--adapter", root / "run", "--no-regression", "--min-preference-accuracy", "0.9",
                             "--out", root / "report")
    assert code == 0, err
    metrics = json.loads((root / "report" / "report.json").read_text())["task"]["metrics"]
    accuracy = metrics["preference_accuracy"]
    assert accuracy["n"] == 8 and accuracy["adapter"] >= 0.9 > accuracy["base"]
    assert metrics["preference_margin"]["adapter"] > metrics["preference_margin"]["base"]
    assert "exact_match" in metrics  # generations against the chosen answers, as for SFT rows
    code, out, err = run_cli("eval", "--adapter", root / "run", "--no-regression", "--min-preference-accuracy", "1.01")
    assert code == 3 and "preference_accuracy" in out + err


@pytest.mark.slow
def test_a_preference_adapter_merges_inspects_and_generates_like_an_sft_one(dpo_run, run_cli):
    root, _ = dpo_run
    code, out, err = run_cli("merge", "--adapter", root / "run", "--out", root / "merged")
    assert code == 0, err
    assert json.loads((root / "merged" / "merge_manifest.json").read_text())
    code, out, err = run_cli("inspect", root / "run")
    assert code == 0, err
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": "Repeat after me: paris"}])
    code, out, err = run_cli("generate", "--prompts", prompts, "--adapter", root / "run", "--max-new-tokens", "4")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["prompt"] == "Repeat after me: paris"


@pytest.mark.slow
def test_kto_trains_on_unpaired_rows(tmp_path, tiny_model_dir, write_yaml, run_cli):
    rows = []
    for pair in repeat_pairs(16):
        rows += [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
                 {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]
    code, out, err = run_cli("train", write_yaml(pref_config(tmp_path, tiny_model_dir, rows, method="kto")))
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    margins = [r["rewards/margins"] for r in records if "rewards/margins" in r]
    assert margins[-1] > margins[0] + 0.5
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["preference"]["method"] == "kto"


def test_kto_rows_with_a_dpo_method_are_refused_before_weights_load(tmp_path, tiny_model_dir, write_yaml, run_cli):
    rows = [{"prompt": "p", "completion": "c", "label": True}] * 4
    code, out, err = run_cli("validate", write_yaml(pref_config(tmp_path, tiny_model_dir, rows)))
    assert code == 2 and "training.method dpo needs prompt/chosen/rejected rows" in err


@pytest.mark.slow
def test_dpo_from_a_finished_sft_run_starts_from_its_adapter_and_records_the_chain(tmp_path, tiny_model_dir, tiny_run,
                                                                                   write_yaml, run_cli):
    from safetensors.torch import load_file

    cfg = pref_config(tmp_path, tiny_model_dir, repeat_pairs(16), repeat_pairs(8, 1, shift=5), max_steps=4)
    cfg["model"]["adapter"] = str(tiny_run)
    code, out, err = run_cli("train", write_yaml(cfg))
    assert code == 0, err
    pref = json.loads((tmp_path / "run" / "manifest.json").read_text())["preference"]
    sft = json.loads((tiny_run / "manifest.json").read_text())
    assert pref["chain"] == [{"adapter": str(tiny_run), "config_hash": sft["config_hash"], "created": sft["created"],
                              "method": "sft", "base_fingerprint": sft["base_model"]["fingerprint"]}]
    assert pref["reference"].startswith("the SFT model")
    # the first logged step compares the policy with the reference at the same weights: both are the SFT model
    first = next(json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                 if "rewards/margins" in line)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-5) and first["rewards/rejected"] == pytest.approx(0.0, abs=1e-5)
    assert first["logps/chosen"] > -5  # the SFT model already repeats the word: a fresh adapter would be far lower
    start, end = load_file(str(tiny_run / "adapter_model.safetensors")), load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    assert start.keys() == end.keys() and any(not (start[k] == end[k]).all() for k in start)
    assert not (tmp_path / "run" / "ref").exists()  # the reference copy is not part of the run folder


def test_start_adapter_trained_on_another_base_is_refused(tmp_path, other_tiny_model_dir, tiny_run, write_yaml, run_cli):
    cfg = pref_config(tmp_path, other_tiny_model_dir, repeat_pairs(8))
    cfg["model"]["adapter"] = str(tiny_run)
    code, out, err = run_cli("train", write_yaml(cfg))
    assert code == 2 and "model.adapter" in err and "another base" in err
    assert not (tmp_path / "run" / "manifest.json").exists()


@pytest.mark.parametrize("damage", ["truncated", "pickle"])
def test_a_damaged_or_pickled_start_adapter_exits_2_naming_the_file(damage, tmp_path, tiny_model_dir, tiny_run,
                                                                    write_yaml, run_cli):
    import shutil

    start = tmp_path / "sft"
    shutil.copytree(tiny_run, start, ignore=shutil.ignore_patterns("checkpoints"))
    weights = start / "adapter_model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        weights.rename(start / "adapter_model.bin")  # never unpickled: refused by name
    cfg = pref_config(tmp_path, tiny_model_dir, repeat_pairs(8))
    cfg["model"]["adapter"] = str(start)
    code, out, err = run_cli("train", write_yaml(cfg))
    expected = "damaged or truncated" if damage == "truncated" else "is a pickle"
    assert code == 2 and "model.adapter" in err and expected in err, err
    assert "Traceback" not in err and not (tmp_path / "run" / "manifest.json").exists()


def test_the_run_folders_resolved_config_loads_back(tmp_path, tiny_model_dir, write_yaml):
    from lora_ft.config_io import config_to_yaml, load_config

    cfg = validate_dict(pref_config(tmp_path, tiny_model_dir, repeat_pairs(4)))
    path = tmp_path / "resolved.yaml"
    path.write_text(config_to_yaml(cfg))
    assert load_config(path) == cfg


def test_data_show_puts_chosen_and_rejected_side_by_side_with_what_is_in_the_loss(tmp_path, tiny_model_dir, write_yaml,
                                                                                   run_cli):
    rows = [{"prompt": "Repeat after me: fox", "chosen": "fox", "rejected": "dog " * 80}]
    code, out, err = run_cli("data", "show", write_yaml(pref_config(tmp_path, tiny_model_dir, rows)), "--rows", "1")
    assert code == 0, err
    assert "<|im_start|>user\nRepeat after me: fox<|im_end|>\n<|im_start|>assistant\n" in out
    assert re.search(r"chosen \(\d tokens in the loss\): \[\[fox<\|im_end\|>\]\]", out)
    assert re.search(r"rejected \(\d+ tokens in the loss, cut from 8\d\): \[\[dog dog", out)


# ---------------------------------------------------------------------------------------------
# Faults: kill -9 and resume, a NaN loss (the same guards as SFT)


def resumable_config(tmp_path, model_dir) -> dict:
    cfg = pref_config(tmp_path, model_dir, repeat_pairs(16), max_steps=8, batch_size=4, logging_steps=1, save_steps=2,
                      save_total_limit=3, gradient_checkpointing=False)
    cfg["lora"]["dropout"] = 0.1  # the RNG state matters on resume
    return cfg


@pytest.mark.slow
def test_dpo_killed_with_sigkill_resumes_to_the_uninterrupted_adapter(tmp_path, tiny_model_dir):
    import signal

    from lora_ft.config_io import load_config
    from lora_ft.train import train
    from test_checkpoints import adapter, loss_steps, max_difference, start_cli, wait_for_step, write_config

    reference = train(validate_dict({**resumable_config(tmp_path / "ref", tiny_model_dir),
                                     "output_dir": str(tmp_path / "reference")})).run_dir
    config = write_config(tmp_path, resumable_config(tmp_path, tiny_model_dir))
    proc = start_cli(config)
    seen = wait_for_step(tmp_path / "run", 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "manifest.json").exists(), f"killed at step {seen}"
    result = train(load_config(config))
    assert max_difference(adapter(result.run_dir), adapter(reference)) < 1e-5, f"killed at step {seen}"
    assert loss_steps(result.run_dir) == list(range(1, 9))


@pytest.mark.slow
def test_a_nan_dpo_loss_stops_the_run_naming_the_step_before_applying_it(tmp_path, run_cli):
    from safetensors.torch import load_file, save_file

    from conftest import build_tokenizer, save_tiny_model

    model_dir = save_tiny_model(tmp_path / "poisoned")
    tilde = build_tokenizer().convert_tokens_to_ids("~")
    weights = load_file(str(model_dir / "model.safetensors"))
    weights["model.embed_tokens.weight"][tilde] = float("nan")
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    rows = repeat_pairs(16)
    rows[5] = {"prompt": "Repeat after me: ~", "chosen": "~", "rejected": "no"}
    cfg = pref_config(tmp_path, model_dir, rows, max_steps=4, batch_size=4, logging_steps=1, save_steps=1)
    code, _, err = run_cli("train", yaml_file(tmp_path, cfg))
    assert code == 2
    assert re.search(r"error: step \d+: loss is nan; stopped before applying it", err)


def yaml_file(tmp_path, data: dict):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_both_logps_falling_for_a_window_warns_once_with_the_cause(tmp_path):
    from types import SimpleNamespace

    from lora_ft.training.preference import FALLING_WINDOW, FallingLogpsCallback

    printed = []
    console = SimpleNamespace(print=printed.append)
    callback = FallingLogpsCallback(console, tmp_path / "metrics.jsonl")
    state = SimpleNamespace(is_world_process_zero=True, global_step=0)
    for step in range(FALLING_WINDOW + 3):
        state.global_step = step
        callback.on_log(None, state, None, logs={"logps/chosen": -10.0 - step, "logps/rejected": -12.0 - 2 * step})
    assert len(printed) == 1 and "both fell for 5 logging steps" in printed[0] and "learning_rate" in printed[0]
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["warning"] == "logps_falling" and record["step"] == FALLING_WINDOW

    quiet = FallingLogpsCallback(console, None)
    for step in range(FALLING_WINDOW + 3):  # rejected falls, chosen rises: the healthy case
        quiet.on_log(None, state, None, logs={"logps/chosen": -10.0 + step, "logps/rejected": -12.0 - step})
    assert len(printed) == 1


@pytest.mark.slow
@pytest.mark.parametrize("variant", [{"use_dora": True}, {"use_rslora": True}], ids=["dora", "rslora"])
def test_dpo_trains_dora_and_rslora_adapters_as_sft_does(tmp_path, tiny_model_dir, write_yaml, run_cli, variant):
    cfg = pref_config(tmp_path, tiny_model_dir, repeat_pairs(16), repeat_pairs(8, 1, shift=5), max_steps=8)
    cfg["lora"].update(variant)
    code, out, err = run_cli("train", write_yaml(cfg))
    assert code == 0, err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert all(manifest["lora"][key] is value for key, value in variant.items())
    heldout = manifest["preference"]["heldout"]
    assert heldout["adapter"]["mean_margin"] > heldout["base"]["mean_margin"]



def test_without_a_chat_template_a_pair_is_prompt_then_answer_and_eos_as_for_sft(tmp_path):
    from conftest import save_tiny_model
    from lora_ft.data.rows import Row, encode, to_example
    from lora_ft.model.loading import load_tokenizer, resolve_model_source

    model_dir = save_tiny_model(tmp_path / "plain", chat_template=None)
    cfg = validate_dict(pref_config(tmp_path, model_dir, repeat_pairs(2)))
    tokenizer = load_tokenizer(cfg.model, resolve_model_source(cfg.model))
    pair = read_pairs([Row({"prompt": "Repeat after me: fox", "chosen": " fox", "rejected": " dog"}, "t:1")], cfg.data,
                      tokenizer, "pairs")[0]
    encoded = encode_pair(pair, tokenizer, max_seq_length=64, max_prompt_length=None)
    sft = encode(to_example(Row({"prompt": "Repeat after me: fox", "completion": " fox"}, "t:1"), "prompt_completion",
                            cfg.data, use_chat=False), tokenizer, train_on="assistant", max_seq_length=64)
    assert encoded.prompt_ids + encoded.chosen_ids == sft.input_ids
    assert encoded.chosen_ids == [t for t in sft.labels if t != -100]
    assert tokenizer.decode(encoded.rejected_ids) == " dog" + tokenizer.eos_token
