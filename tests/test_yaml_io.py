"""The one YAML reader: a key written twice is an error naming both lines; documented words stay words."""

from __future__ import annotations

import pytest

from lora_ft.config_io import load_config, validate_dict
from lora_ft.errors import ConfigError
from lora_ft.yaml_io import load_yaml


def test_a_key_written_twice_exits_2_naming_the_key_and_both_lines(tmp_path, tiny_config, write_yaml, run_cli):
    path = tmp_path / "twice.yaml"
    path.write_text(f"model:\n  name: {tiny_config['model']['name']}\noutput_dir: runs/a\ndata:\n  train: x.jsonl\noutput_dir: runs/b\n")
    code, _, err = run_cli("validate", path)
    assert code == 2
    assert err == f"error: {path}:6: key 'output_dir' appears twice (lines 3 and 6); YAML would silently keep the last one: delete one of them\n"


def test_a_nested_key_written_twice_is_refused_too():
    with pytest.raises(ConfigError, match="line 3: key 'rank' appears twice \\(lines 2 and 3\\)"):
        load_yaml("lora:\n  rank: 8\n  rank: 16\n")


def test_documented_word_off_is_read_as_written(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: m\ndata:\n  train: t.jsonl\n  checks:\n    balance: off\n    duplicates: off\n")
    checks = load_config(path).data.checks
    assert (checks.balance, checks.duplicates) == ("off", "off")


def test_set_override_with_off_is_read_as_the_word():
    path_free = {"model": {"name": "m"}, "data": {"train": "t.jsonl"}}
    from lora_ft.config_io import apply_override

    apply_override(path_free, "data.checks.balance=off")
    assert validate_dict(path_free).data.checks.balance == "off"


def test_yes_no_on_off_stay_words_and_boolean_fields_still_accept_them(tmp_path):
    assert load_yaml("[yes, no, on, off, true, false, True]") == ["yes", "no", "on", "off", True, False, True]
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: m\n  trust_remote_code: no\nserving:\n  merge_adapter: yes\n")
    cfg = load_config(path)
    assert cfg.model.trust_remote_code is False and cfg.serving.merge_adapter is True
