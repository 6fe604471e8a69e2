"""Chat data trains what it should: every assistant turn, ending with the end-of-turn token, and nothing else."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tokenizer, copy_rows, write_jsonl
from lora_ft.chat_template import check_end_of_turn, end_of_turn_token, require_end_of_turn, stop_token_ids
from lora_ft.config import DataSpec, validate_dict
from lora_ft.data import Example, encode
from lora_ft.errors import DataError
from lora_ft.model import read_chat_template

CONVERSATION = (
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yes"},
    {"role": "user", "content": "again"},
    {"role": "assistant", "content": "no"},
)


def _tokenizer(template: str):
    tokenizer = build_tokenizer(chat_template=None)
    if template == "llama3":
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tokenizer.chat_template = read_chat_template(template)
    return tokenizer


def _trained_and_masked(template: str, train_on: str):
    tokenizer = _tokenizer(template)
    item = encode(Example(CONVERSATION, None, "t:1"), tokenizer, train_on=train_on, max_seq_length=512)
    pieces = [(tokenizer.decode([t]), label != -100) for t, label in zip(item.input_ids, item.labels)]
    spans, previous = [], False  # contiguous trained token runs, decoded
    for text, on in pieces:
        if on and previous:
            spans[-1] += text
        elif on:
            spans.append(text)
        previous = on
    return tokenizer, item, pieces, spans


@pytest.mark.parametrize(
    "template, expected",
    [
        ("chatml", ["yes<|im_end|>", "no<|im_end|>"]),
        ("llama3", ["yes<|eot_id|>", "no<|eot_id|>"]),
    ],
)
def test_every_assistant_turn_and_its_end_of_turn_token_are_trained_and_nothing_else(template, expected):
    tokenizer, item, pieces, trained = _trained_and_masked(template, "assistant")
    assert trained == expected
    # Token by token: the masked text is exactly the rendering minus the trained spans.
    masked_text = "".join(text for text, on in pieces if not on)
    full = tokenizer.apply_chat_template(list(CONVERSATION), tokenize=False)
    assert masked_text == full.replace(expected[0], "", 1).replace(expected[1], "", 1)


def test_last_assistant_trains_only_the_final_turn():
    _, _, _, trained = _trained_and_masked("chatml", "last_assistant")
    assert trained == ["no<|im_end|>"]


def test_train_on_all_trains_every_token():
    _, item, _, _ = _trained_and_masked("chatml", "all")
    assert item.labels == item.input_ids


@pytest.mark.parametrize("template, token", [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>")])
def test_end_of_turn_token_is_found_from_the_template(template, token):
    tokenizer = _tokenizer(template)
    assert end_of_turn_token(tokenizer) == token
    assert tokenizer.convert_tokens_to_ids(token) in stop_token_ids(tokenizer)


def test_a_template_whose_turns_do_not_end_with_a_token_is_refused_before_training():
    tokenizer = build_tokenizer(chat_template=None)
    # Broken on purpose: turns end with a newline, no end-of-turn token, so a trained model cannot learn to stop.
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    encoded = [encode(Example(CONVERSATION, None, "t:1"), tokenizer, train_on="assistant", max_seq_length=512)]
    report = check_end_of_turn(encoded, tokenizer, "assistant")
    assert report.token is None and report.turns == 2
    with pytest.raises(DataError, match="no end-of-turn token"):
        require_end_of_turn(report)


def test_data_show_marks_trained_tokens_and_the_cut(tmp_path, tiny_config, write_yaml, run_cli):
    rows = [{"messages": list(CONVERSATION)}]
    tiny_config["data"] = {"train": str(write_jsonl(tmp_path / "chat.jsonl", rows))}
    tiny_config["training"]["max_seq_length"] = 20
    code, out, err = run_cli("data", "show", write_yaml(tiny_config), "--rows", "1")
    assert code == 0, err
    assert "[[yes<|im_end|>]]" in out
    assert "|<cut" in out and "cut at token 20" in out
    assert not (tmp_path / "run").exists()


def test_trained_model_stops_at_the_end_of_turn_token(tmp_path, tiny_config):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from lora_ft.train import train

    tiny_config["training"].update(max_steps=40, learning_rate=3e-2)
    result = train(validate_dict(tiny_config))
    run = result.run_dir
    generation = GenerationConfig.from_pretrained(run)
    tokenizer = AutoTokenizer.from_pretrained(run)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in generation.eos_token_id
    assert json.loads((run / "manifest.json").read_text())["chat"]["end_of_turn"] == "<|im_end|>"

    base = AutoModelForCausalLM.from_pretrained(tiny_config["model"]["name"])
    model = PeftModel.from_pretrained(base, run).eval()
    stopped = 0
    for row in copy_rows(8):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**prompt, generation_config=generation, max_new_tokens=12)
        new = out[0, prompt["input_ids"].shape[1]:].tolist()
        stopped += new[-1] == im_end and len(new) < 12
    assert stopped == 8
