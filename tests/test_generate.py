"""Generation shared by eval, generate and chat: left-padded batches, stop ids, the run's template, one loader."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import write_jsonl
from lora_ft.config_io import validate_dict
from lora_ft.data.conversation import Conversation, stop_ids_for
from lora_ft.errors import LoraftError
from lora_ft.serving.inference import BASE, GenerationSettings, generate_batched, load_for_inference
from lora_ft.train import train

PROMPTS = [
    "Repeat after me: fox",
    "What is the capital of France?",
    "a b c",
    "convert this request to json title day time place: lunch friday 13:00 home",
    "Hello world!",
    "yes",
]




@pytest.fixture(scope="module")
def inference(tiny_run):
    return load_for_inference(tiny_run)


def _ids(inference, label=BASE):
    return [inference.render([{"role": "user", "content": p}], label) for p in PROMPTS]


def test_batched_greedy_generation_equals_one_prompt_at_a_time(inference):
    ids = _ids(inference)
    assert len({len(i) for i in ids}) > 3, "prompts of different lengths, so batches need left padding"
    for label in (BASE, inference.labels[0]):
        batched = inference.generate(ids, GenerationSettings(max_new_tokens=12, batch_size=4), label, progress=False)
        single = inference.generate(ids, GenerationSettings(max_new_tokens=12, batch_size=1), label, progress=False)
        assert batched == single
        assert sum(g.new_tokens for g in batched) > len(ids), "the comparison covers real continuations, not empty ones"


def test_greedy_generation_is_deterministic_across_calls(inference):
    ids = _ids(inference)
    settings = GenerationSettings(max_new_tokens=10, batch_size=3)
    first = inference.generate(ids, settings, progress=False)
    assert inference.generate(ids, settings, progress=False) == first


def test_sampling_is_reproducible_with_its_seed_and_differs_from_greedy(inference):
    ids = _ids(inference)
    sampled = GenerationSettings(max_new_tokens=10, batch_size=6, do_sample=True, temperature=2.0, top_p=1.0, seed=7)
    a = inference.generate(ids, sampled, progress=False)
    assert inference.generate(ids, sampled, progress=False) == a
    greedy = inference.generate(ids, GenerationSettings(max_new_tokens=10, batch_size=6), progress=False)
    assert [g.text for g in a] != [g.text for g in greedy]


def test_stopped_is_true_only_when_a_stop_id_ends_the_answer(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from lora_ft.model.loading import ModelSpec, load_tokenizer, resolve_model_source

    spec = ModelSpec(name=str(tiny_model_dir))
    tokenizer = load_tokenizer(spec, resolve_model_source(spec))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        model.model.norm.weight.zero_()  # every logit is 0, so greedy always picks token id 0
    prompts = [tokenizer("a b c")["input_ids"], tokenizer("the quick brown fox")["input_ids"]]
    never = generate_batched(model, tokenizer, prompts, GenerationSettings(max_new_tokens=5), eos_ids=[4], progress=False)
    assert [(g.new_tokens, g.stopped) for g in never] == [(5, False), (5, False)]
    at_once = generate_batched(model, tokenizer, prompts, GenerationSettings(max_new_tokens=5), eos_ids=[4, 0], progress=False)
    assert [(g.new_tokens, g.stopped, g.text) for g in at_once] == [(0, True, ""), (0, True, "")]


def test_stop_ids_are_eos_plus_end_of_turn_tokens(tiny_model_dir):
    from conftest import build_tokenizer

    tokenizer = build_tokenizer()
    im_end, eos = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("</s>")
    assert tokenizer.eos_token_id == im_end and stop_ids_for(tokenizer) == (im_end,)
    tokenizer.eos_token = "</s>"  # a base whose EOS is not the template's end-of-turn token
    assert stop_ids_for(tokenizer) == tuple(sorted({eos, im_end}))
    assert Conversation.of_base(tokenizer).stop_ids == tuple(sorted({eos, im_end}))
    assert stop_ids_for(tokenizer, model_eos=[7, im_end]) == tuple(sorted({eos, im_end, 7})), "and the base's own EOS ids"


def test_the_runs_saved_stop_ids_are_used_and_an_older_run_falls_back_to_its_generation_config(tiny_run, tmp_path):
    import shutil

    copy = tmp_path / "run_copy"
    shutil.copytree(tiny_run, copy)
    saved = json.loads((copy / "conversation.json").read_text())
    (copy / "conversation.json").write_text(json.dumps({**saved, "stop_ids": [3, 5]}))
    loaded = load_for_inference(copy)
    assert loaded.eos_ids[loaded.labels[0]] == [3, 5]
    assert loaded.eos_ids[BASE] == [3, 5], "the base is prompted and stopped like the adapter"
    (copy / "conversation.json").unlink()  # a run saved before conversation.json existed
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 4]}))
    assert load_for_inference(copy).eos_ids[BASE] == [3, 4]


def test_prompts_render_with_the_runs_saved_template(inference, tiny_run):
    conversation = inference.conversation(inference.labels[0])
    assert conversation.tokenizer.chat_template == (tiny_run / "chat_template.jinja").read_text()
    messages, reference = conversation.prompt({"prompt": "Repeat after me: fox", "completion": "fox"}, "t:1")
    assert reference == "fox"
    assert conversation.tokenizer.decode(conversation.prompt_ids(messages)) == (
        "<|im_start|>user\nRepeat after me: fox<|im_end|>\n<|im_start|>assistant\n"
    )


def test_prompt_rows_accept_messages_with_reference_and_reject_bad_rows():
    from conftest import build_tokenizer

    chat_row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    trained_on_prompts = Conversation.for_training(build_tokenizer(), fmt="prompt_completion", system_prompt="be brief")
    system = {"role": "system", "content": "be brief"}
    assert trained_on_prompts.prompt(chat_row, "f:1") == ([system, {"role": "user", "content": "hi"}], "hello")
    messages, reference = trained_on_prompts.prompt({"instruction": "Add", "input": "1 2"}, "f:2")
    assert messages == [system, {"role": "user", "content": "Add\n\n1 2"}] and reference is None
    trained_on_chat = Conversation.for_training(build_tokenizer(), fmt="chat", system_prompt="be brief")
    assert trained_on_chat.system_prompt is None, "training never put it in front of a chat row"
    assert trained_on_chat.prompt(chat_row, "f:1") == ([{"role": "user", "content": "hi"}], "hello")
    with pytest.raises(LoraftError, match="f:3: a prompt row needs"):
        trained_on_chat.prompt({"question": "x"}, "f:3")
    with pytest.raises(LoraftError, match="f:4: the conversation must end with a user turn"):
        trained_on_chat.prompt({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}, "f:4")


def test_loader_refuses_an_adapter_on_another_base(tiny_run, other_tiny_model_dir):
    with pytest.raises(LoraftError, match="is not the model this adapter was trained on"):
        load_for_inference(tiny_run, base=str(other_tiny_model_dir))
    forced = load_for_inference(tiny_run, base=str(other_tiny_model_dir), force=True)
    assert forced.base_matches is False


def test_generate_cli_writes_one_jsonl_row_per_prompt_with_base_and_adapter(tiny_run, tmp_path, run_cli):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS[:4]])
    out = tmp_path / "answers.jsonl"
    code, stdout, _ = run_cli("generate", "--adapter", tiny_run, "--with-base", "--prompts", prompts, "--out", out, "--max-new-tokens", "6")
    assert code == 0, stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4
    assert [list(r["outputs"]) for r in rows] == [["base", "run"]] * 4
    assert all(r["outputs"]["run"]["new_tokens"] <= 6 for r in rows)
    assert rows[0]["prompt"] == PROMPTS[0] and rows[0]["input"] == {"prompt": PROMPTS[0]}
    assert "[base]" in stdout and "[run]" in stdout


def test_generate_cli_compares_two_adapters_and_prints_jsonl_without_out(tiny_run, tmp_path, run_cli, tiny_config):
    tiny_config["training"]["max_steps"] = 5
    second = train(validate_dict(tiny_config)).run_dir
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Repeat after me: dog"}])
    code, stdout, _ = run_cli("generate", "--adapter", tiny_run, "--adapter", second, "--prompts", prompts, "--max-new-tokens", "4")
    assert code == 0
    row = json.loads(stdout.strip().splitlines()[0])
    assert sorted(row["outputs"]) == ["adapter1", "adapter2"]  # both folders are named "run"


def test_generate_cli_base_only_and_missing_prompt_field(tiny_run, tmp_path, run_cli):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a b c"}, {"question": "x"}])
    code, _, stderr = run_cli("generate", "--adapter", tiny_run, "--base-only", "--prompts", prompts)
    assert code == 2
    assert "p.jsonl:2: a prompt row needs 'prompt', 'instruction' or 'messages'" in stderr


def test_chat_streams_replies_keeps_history_per_model_and_resets(tiny_run, inference, monkeypatch):
    from typer.testing import CliRunner

    from lora_ft import generate as gen
    from lora_ft.cli import app

    calls = []
    original = gen.Inference.stream

    def spy(self, messages, settings, label=BASE, **options):
        call = {"label": label, "history": [m["content"] for m in messages], "reply": ""}
        calls.append(call)
        for piece in original(self, messages, settings, label, **options):
            call["reply"] += piece
            yield piece

    monkeypatch.setattr(gen.Inference, "stream", spy)
    result = CliRunner().invoke(
        app, ["chat", "--adapter", str(tiny_run), "--with-base", "--max-new-tokens", "4"], input="hello\nagain\n/reset\nfresh\n/exit\n"
    )
    assert result.exit_code == 0, result.output
    assert [(c["label"], c["history"]) for c in calls] == [
        ("base", ["hello"]), ("run", ["hello"]),
        ("base", ["hello", calls[0]["reply"], "again"]), ("run", ["hello", calls[1]["reply"], "again"]),
        ("base", ["fresh"]), ("run", ["fresh"]),
    ]
    for call in calls[2:4]:  # the streamed text is exactly what batched greedy generation gives for that history
        history = [{"role": r, "content": c} for r, c in zip(("user", "assistant", "user"), call["history"])]
        label = BASE if call["label"] == "base" else inference.labels[0]
        expected = inference.generate([inference.render(history, label)], GenerationSettings(max_new_tokens=4), label, progress=False)
        assert call["reply"] == expected[0].text
    assert calls[1]["reply"] in result.stdout and result.stdout.count("run> ") == 3


def test_generate_refuses_a_missing_prompts_file_before_loading_a_model(tmp_path, run_cli, monkeypatch):
    import lora_ft.serving.inference as inference_module

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded for a missing prompts file")

    monkeypatch.setattr(inference_module, "load_for_inference", must_not_load)
    code, _, err = run_cli("generate", "--prompts", tmp_path / "none.jsonl", "--base-only")
    assert code == 2 and "--prompts: data file not found" in err
