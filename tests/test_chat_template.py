"""Chat data trains what it should: every assistant turn, ending with the end-of-turn token, and nothing else."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tokenizer, copy_rows, write_jsonl
from lora_ft.data.chat_template import check_end_of_turn, require_end_of_turn
from lora_ft.data.conversation import end_of_turn_token, stop_ids_for
from lora_ft.config import DataSpec
from lora_ft.config_io import validate_dict
from lora_ft.data.rows import Example, encode
from lora_ft.errors import DataError
from lora_ft.model.loading import read_chat_template

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
    assert tokenizer.convert_tokens_to_ids(token) in stop_ids_for(tokenizer)


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


def test_a_builtin_template_whose_tokens_the_vocabulary_lacks_is_refused_with_the_ones_that_fit(tmp_path):
    from conftest import save_tiny_model
    from lora_ft.config import ModelSpec
    from lora_ft.errors import ConfigError
    from lora_ft.model.loading import load_tokenizer, resolve_model_source

    folder = save_tiny_model(tmp_path / "base", chat_template=None)  # a base model: ChatML tokens, no template
    spec = ModelSpec(name=str(folder), chat_template="llama3")
    with pytest.raises(ConfigError, match=r"llama3 needs the special tokens <\|start_header_id\|>.*use one that fits \(chatml, mistral\)"):
        load_tokenizer(spec, resolve_model_source(spec))
    chatml = load_tokenizer(ModelSpec(name=str(folder), chat_template="chatml"), resolve_model_source(spec))
    assert end_of_turn_token(chatml) == "<|im_end|>"


# ---------------------------------------------------------------------------------------------
# Tool use: the fields a template renders reach it, and train or mask with their turn

# A Qwen2.5-style tool template (written here, not copied): tools in the system block, an assistant's calls as
# <tool_call> JSON inside its turn, tool results grouped into one user block. It ignores tool_call_id.
TOOL_TEMPLATE = (
    "{%- if tools -%}"
    "{{ '<|im_start|>system\\n' }}{% if messages[0].role == 'system' %}{{ messages[0].content + '\\n\\n' }}{% endif %}"
    "{{ '# Tools\\n<tools>' }}{% for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}{{ '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' -%}{{ '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) -%}"
    "{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' + message.content }}"
    "{%- for call in message.tool_calls or [] -%}"
    "{{ '<tool_call>\\n' + ({'name': call.function.name, 'arguments': call.function.arguments} | tojson) + '\\n</tool_call>' }}"
    "{%- endfor -%}{{ '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' -%}"
    "{%- if messages[loop.index0 - 1].role != 'tool' %}{{ '<|im_start|>user' }}{% endif -%}"
    "{{ '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{ '<|im_end|>\\n' }}{% endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}"
)
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                  "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
TOOL_ROW = {
    "tools": [WEATHER_TOOL],
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
        {"role": "assistant", "content": "It is sunny in Paris."},
    ],
}
TOOL_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def _tool_example(row: dict = TOOL_ROW):
    from lora_ft.data.rows import Row, to_example

    return to_example(Row(row, "t:1"), "chat", DataSpec(train={"path": "x.jsonl"}), use_chat=True)


def _trained_spans(tokenizer, item) -> list[str]:
    spans, previous = [], False
    for token, label in zip(item.input_ids, item.labels):
        if label != -100:
            text = tokenizer.decode([token])
            spans[-1:] = [spans[-1] + text] if previous else spans[-1:] + [text]
        previous = label != -100
    return spans


def test_a_tool_use_conversation_trains_the_tool_call_turn_and_the_answer_and_masks_the_tool_result():
    tokenizer = _tokenizer("chatml")
    tokenizer.chat_template = TOOL_TEMPLATE
    item = encode(_tool_example(), tokenizer, train_on="assistant", max_seq_length=512)
    assert _trained_spans(tokenizer, item) == [TOOL_CALL + "<|im_end|>", "It is sunny in Paris.<|im_end|>"]
    masked = tokenizer.decode([t for t, label in zip(item.input_ids, item.labels) if label == -100])
    assert '"name": "get_weather", "description": "Weather in a city"' in masked  # the row's tools reach the template
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in masked
    report = check_end_of_turn([item], tokenizer, "assistant")
    assert (report.turns, report.missing) == (2, 0)


def test_data_show_shows_the_tool_call_inside_the_trained_span(tmp_path, tiny_config, write_yaml, run_cli):
    (tmp_path / "tools.jinja").write_text(TOOL_TEMPLATE)
    tiny_config["model"]["chat_template"] = str(tmp_path / "tools.jinja")
    tiny_config["data"] = {"train": str(write_jsonl(tmp_path / "chat.jsonl", [TOOL_ROW]))}
    code, out, err = run_cli("data", "show", write_yaml(tiny_config), "--rows", "1")
    assert code == 0, err
    assert f"<|im_start|>assistant\n[[{TOOL_CALL}<|im_end|>]]" in out
    assert "[[It is sunny in Paris.<|im_end|>]]" in out


def test_fields_the_template_ignores_are_reported_once_with_a_count(tmp_path, tiny_config, write_yaml, run_cli):
    tiny_config["data"] = {"train": str(write_jsonl(tmp_path / "chat.jsonl", [TOOL_ROW] * 3))}
    tiny_config["data"]["checks"] = {"duplicates": "off"}
    config = write_yaml(tiny_config)
    # The tiny model's ChatML template renders content only: the calls, the tool list and the call id vanish.
    code, out, err = run_cli("data", "check", config, "--report", tmp_path / "plain")
    assert code == 0, err
    report = json.loads((tmp_path / "plain" / "data_report.json").read_text())
    (finding,) = [f for f in report["findings"] if f["check"] == "chat_fields"]
    assert (finding["name"], finding["count"], finding["level"]) == ("ignored_by_template", 3, "warn")
    assert "tool_calls (3x), tool_call_id (3x), tools (3x)" in finding["message"]
    assert finding["examples"][0]["fields"] == "tool_call_id, tool_calls, tools"
    # A template that renders tool calls and tools: only the id it never reads is reported.
    (tmp_path / "tools.jinja").write_text(TOOL_TEMPLATE)
    code, out, err = run_cli("data", "check", config, "--set", f"model.chat_template={tmp_path / 'tools.jinja'}",
                             "--report", tmp_path / "tools")
    report = json.loads((tmp_path / "tools" / "data_report.json").read_text())
    (finding,) = [f for f in report["findings"] if f["check"] == "chat_fields"]
    assert finding["count"] == 3 and "the model never sees them: tool_call_id (3x);" in finding["message"]


def test_train_accepts_tool_rows_and_warns_once_about_the_field_the_template_ignores(tmp_path, tiny_config):
    import io

    from rich.console import Console

    from lora_ft.train import train

    (tmp_path / "tools.jinja").write_text(TOOL_TEMPLATE)
    tiny_config["model"]["chat_template"] = str(tmp_path / "tools.jinja")
    tiny_config["data"] = {"train": str(write_jsonl(tmp_path / "chat.jsonl", [TOOL_ROW] * 4)), "checks": {"duplicates": "off"}}
    tiny_config["training"].update(max_steps=2, max_seq_length=512, batch_size=4)
    log = io.StringIO()
    result = train(validate_dict(tiny_config), console=Console(file=log, width=300))
    printed = log.getvalue()
    assert printed.count("warning:") == 1
    assert "chat_fields (train): 4 rows have fields the chat template does not render" in printed and "tool_call_id (4x)" in printed
    assert "end of turn: <|im_end|> trained in 8 assistant turns" in printed  # the tool-call turn and the answer, 4 rows
    assert result.manifest.metrics.steps == 2


@pytest.mark.parametrize(
    "messages, error",
    [
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
         "two user messages in a row"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}],
         "two assistant messages in a row; user and assistant turns must alternate; tool results go between"),
        ([{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}, {"role": "assistant", "content": "c"}],
         "message 1 has role 'wizard'"),
        ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}, {"role": "assistant", "content": "c"}],
         "message 1 is a tool result after a user message"),
        ([{"role": "tool", "content": "a"}, {"role": "assistant", "content": "c"}],
         "message 0 is a tool result before any assistant turn called a tool"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None}],
         "message 1 content must be a string"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "tool_calls": {"name": "f"}}],
         "message 1 'tool_calls' must be a list of objects on an assistant message"),
        ([{"role": "user", "content": "a", "tool_calls": [{"name": "f"}]}, {"role": "assistant", "content": "c"}],
         "message 0 'tool_calls' must be a list of objects on an assistant message"),
    ],
)
def test_conversation_rules_stay_strict_for_real_mistakes(messages, error):
    with pytest.raises(DataError, match=r"^t:1: " + error.replace("(", r"\(").replace(")", r"\)")):
        _tool_example({"messages": messages})


def test_a_tools_field_that_is_not_a_list_of_definitions_is_refused():
    with pytest.raises(DataError, match="field 'tools' must be a list of tool definitions"):
        _tool_example({**TOOL_ROW, "tools": {"name": "get_weather"}})
    assert _tool_example({**TOOL_ROW, "tools": json.dumps([WEATHER_TOOL])}).tools == (WEATHER_TOOL,)
