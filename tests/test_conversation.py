"""The run's conversation format: one owner of row -> messages -> ids and of the stop ids, saved with the run,
and every command (train, eval, generate, chat, serve) prompts and stops a run the same way through it."""

from __future__ import annotations

import json

import pytest

from conftest import build_tokenizer, copy_rows, write_jsonl
from lora_ft.config_io import validate_dict
from lora_ft.data.conversation import FILE, Conversation, stop_ids_for
from lora_ft.data.encoding import Example, encode
from lora_ft.errors import LoraftError

SYSTEM = "Answer with one word."
PROMPT = "Repeat after me: fox"


def _config(root, name: str, rows: list[dict], *, model: str, **data) -> dict:
    return {
        "model": {"name": model},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(write_jsonl(root / f"{name}_train.jsonl", rows[:16])),
                 "eval": str(write_jsonl(root / f"{name}_eval.jsonl", rows[16:])),
                 "system_prompt": SYSTEM, "checks": {"leakage": "warn", "duplicates": "off"}, **data},
        "training": {"max_steps": 2, "batch_size": 8, "learning_rate": 1e-2, "max_seq_length": 64, "logging_steps": 1,
                     "precision": "fp32", "warmup_ratio": 0.0},
        "output_dir": str(root / name),
    }


def _chat_rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in copy_rows(n)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Two tiny runs, both configured with data.system_prompt: one trained on chat rows, one on prompt/completion rows."""
    from lora_ft.train import train

    root = tmp_path_factory.mktemp("conversation_runs")
    chat = train(validate_dict(_config(root, "chat", _chat_rows(20), model=str(tiny_model_dir)))).run_dir
    prompt = train(validate_dict(_config(root, "prompt", copy_rows(20), model=str(tiny_model_dir)))).run_dir
    return {"chat": chat, "prompt": prompt}


# ---------------------------------------------------------------------------------------------
# The rule, unit by unit


def test_the_system_prompt_is_the_runs_only_where_training_put_it_in_front_of_rows():
    tokenizer = build_tokenizer()
    assert Conversation.for_training(tokenizer, fmt="prompt_completion", system_prompt=SYSTEM).system_prompt == SYSTEM
    assert Conversation.for_training(tokenizer, fmt="alpaca", system_prompt=SYSTEM).system_prompt == SYSTEM
    assert Conversation.for_training(tokenizer, fmt="chat", system_prompt=SYSTEM).system_prompt is None
    assert Conversation.for_training(tokenizer, fmt="text", system_prompt=SYSTEM).system_prompt is None
    plain = build_tokenizer(chat_template=None)
    assert Conversation.for_training(plain, fmt="prompt_completion", system_prompt=SYSTEM).system_prompt is None


def test_a_conversation_with_its_own_system_message_keeps_it():
    conversation = Conversation.for_training(build_tokenizer(), fmt="prompt_completion", system_prompt=SYSTEM)
    own = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"}]
    assert conversation.with_system(own) == own
    assert conversation.with_system(own[1:]) == [{"role": "system", "content": SYSTEM}, own[1]]


def test_saved_conversation_reads_back_equal_and_a_damaged_file_is_one_clear_error(tmp_path):
    tokenizer = build_tokenizer()
    conversation = Conversation.for_training(tokenizer, fmt="prompt_completion", system_prompt=SYSTEM, model_eos=[2])
    conversation.save(tmp_path)
    saved = json.loads((tmp_path / FILE).read_text())
    assert saved["stop_ids"] == sorted({2, tokenizer.convert_tokens_to_ids("<|im_end|>")})
    assert saved["stop_tokens"] == ["</s>", "<|im_end|>"] and saved["end_of_turn"] == "<|im_end|>"
    assert Conversation.read(tmp_path, tokenizer) == conversation
    assert Conversation.read(tmp_path / "nowhere", tokenizer) is None
    (tmp_path / FILE).write_text(json.dumps({**saved, "stop_ids": "4"}))
    with pytest.raises(LoraftError, match="conversation.json: stop_ids has the wrong type"):
        Conversation.read(tmp_path, tokenizer)


def test_a_system_prompt_with_a_credential_is_saved_redacted(tmp_path):
    secret = "hf_" + "Ab1" * 10
    Conversation.for_training(build_tokenizer(), fmt="prompt_completion", system_prompt=f"key {secret}").save(tmp_path)
    assert secret not in (tmp_path / FILE).read_text()


def test_one_bos_rule_for_plain_text_in_training_and_in_prompts():
    tokenizer = build_tokenizer(chat_template=None)
    from tokenizers import processors

    bos = tokenizer.bos_token_id
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    conversation = Conversation.for_training(tokenizer, fmt="prompt_completion", system_prompt=None)
    assert conversation.bos == "<s>"
    prompt = conversation.prompt_ids([{"role": "prompt", "content": "a b c"}])
    trained = conversation.encode(conversation.example({"prompt": "a b c", "completion": " d"}, "t:1", "prompt_completion"),
                                  train_on="assistant", max_seq_length=64)
    text = conversation.encode(Example(None, "a b c", "t:2"), train_on="assistant", max_seq_length=64)
    assert prompt[0] == bos and trained.input_ids[: len(prompt)] == prompt and text.input_ids[0] == bos
    assert trained.labels[: len(prompt)] == [-100] * len(prompt) and text.labels[0] == -100, "BOS is never trained"


def test_encode_answer_labels_only_the_answer_and_its_end_of_turn():
    tokenizer = build_tokenizer()
    conversation = Conversation.for_training(tokenizer, fmt="prompt_completion", system_prompt=SYSTEM)
    prompt = [{"role": "user", "content": PROMPT}]
    chosen = conversation.encode_answer(prompt, "fox", max_seq_length=64)
    rejected = conversation.encode_answer(prompt, "dog dog", max_seq_length=64)
    prompt_ids = conversation.prompt_ids(prompt)
    for item, answer in ((chosen, "fox"), (rejected, "dog dog")):
        assert item.input_ids[: len(prompt_ids)] == prompt_ids, "the prompt is the one generation continues"
        trained = [t for t, label in zip(item.input_ids, item.labels) if label != -100]
        assert tokenizer.decode(trained) == answer + "<|im_end|>"
    same = encode(Example(tuple(conversation.with_system(prompt)) + ({"role": "assistant", "content": "fox"},), None, "pair"),
                  tokenizer, train_on="assistant", max_seq_length=64)
    assert (chosen.input_ids, chosen.labels) == (same.input_ids, same.labels), "exactly as training encodes that row"


def test_stop_ids_are_one_set_from_the_tokenizer_and_the_bases_eos():
    tokenizer = build_tokenizer()
    im_end, end = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("</s>")
    assert stop_ids_for(tokenizer) == (im_end,)
    assert stop_ids_for(tokenizer, model_eos=end) == tuple(sorted({im_end, end}))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|eot_id|>"]})  # a known end-of-turn token in the vocabulary
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") in stop_ids_for(tokenizer)


# ---------------------------------------------------------------------------------------------
# Parity: every command builds the same prompt ids and stops on the same ids


def _prompt_ids_of_every_command(run, row: dict, monkeypatch, tmp_path) -> dict[str, list[int]]:
    """The prompt ids serve, generate, chat and eval build for one user turn of the run's task."""
    from typer.testing import CliRunner

    from lora_ft.cli import app
    from lora_ft.generate import generate_file
    from lora_ft.serving import inference as gen
    from lora_ft.evaluate import evaluate
    from lora_ft.serving.batching import ModelPool

    found: dict[str, list[int]] = {}
    inference = gen.load_for_inference(run)
    label = inference.labels[0]

    def fake_generate(self, prompts, settings, label=gen.BASE, *, progress=None):
        found.setdefault("generated", []).append(list(prompts[0]))
        return [gen.Generation("", 0, True) for _ in prompts]

    monkeypatch.setattr(gen.Inference, "generate", fake_generate)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [row])
    generate_file(inference, prompts, gen.GenerationSettings(max_new_tokens=2), labels=[label], progress=False)
    found["generate"] = found.pop("generated")[0]

    with_answer = {"messages": row["messages"] + [{"role": "assistant", "content": "fox"}]} if "messages" in row else {**row, "completion": "fox"}
    evaluate(run, data=[write_jsonl(tmp_path / "eval.jsonl", [with_answer])], regression=[], inference=inference, progress=False)
    found["eval"] = found.pop("generated")[0]
    monkeypatch.undo()

    rendered = []
    original = gen.Inference.render

    def spy(self, *args, **kwargs):
        rendered.append(original(self, *args, **kwargs))
        return rendered[-1]

    monkeypatch.setattr(gen.Inference, "render", spy)
    monkeypatch.setattr(gen, "load_for_inference", lambda *a, **k: inference)
    result = CliRunner().invoke(app, ["chat", "--adapter", str(run), "--max-new-tokens", "1"], input=PROMPT + "\n/exit\n")
    assert result.exit_code == 0, result.output
    found["chat"] = rendered[0]

    pool = ModelPool.load({"run": str(run)})
    found["serve"] = pool.get("run").render_chat([{"role": "user", "content": PROMPT}])
    return found


@pytest.mark.parametrize("trained_on, row", [
    ("chat", {"messages": [{"role": "user", "content": PROMPT}]}),
    ("prompt", {"prompt": PROMPT}),
])
def test_serve_generate_chat_and_eval_build_the_same_prompt_ids(runs, trained_on, row, monkeypatch, tmp_path):
    found = _prompt_ids_of_every_command(runs[trained_on], row, monkeypatch, tmp_path)
    assert found["serve"] == found["generate"] == found["chat"] == found["eval"], {k: len(v) for k, v in found.items()}
    tokenizer = build_tokenizer()
    text = tokenizer.decode(found["serve"])
    if trained_on == "chat":  # training never showed a chat row the configured system prompt
        assert text == f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    else:  # training put it in front of every prompt/completion row
        assert text == f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"


def test_train_and_eval_measure_stopping_on_the_stop_ids_generation_stops_on(runs, monkeypatch):
    from lora_ft import evaluate as evaluate_module  # stop_score is looked up there (imported at its top)
    from lora_ft.evaluate import evaluate
    from lora_ft.serving import inference as gen
    from lora_ft.serving.batching import ModelPool

    run = runs["prompt"]
    manifest = json.loads((run / "manifest.json").read_text())
    trained = manifest["stop_tokens"]["after_training"]["stop_ids"]
    measured = []
    original = evaluate_module.stop_score
    monkeypatch.setattr(evaluate_module, "stop_score", lambda model, encoded, ids, **kw: measured.append(sorted(ids)) or original(model, encoded, ids, **kw))
    inference = gen.load_for_inference(run)
    evaluate(run, regression=[], inference=inference, progress=False)
    assert measured and all(ids == sorted(trained) for ids in measured)
    assert inference.eos_ids[inference.labels[0]] == sorted(trained)
    assert sorted(ModelPool.load({"run": str(run)}).get("run").stop_ids) == sorted(trained)
    assert json.loads((run / "generation_config.json").read_text())["eos_token_id"] == sorted(trained)
    assert json.loads((run / FILE).read_text())["stop_ids"] == sorted(trained) == manifest["chat"]["stop_token_ids"]


def test_a_run_saved_before_conversation_json_is_prompted_as_it_was_trained(runs, tmp_path):
    import shutil

    from lora_ft.serving.inference import load_for_inference

    for trained_on, expected_system in (("chat", None), ("prompt", SYSTEM)):
        copy = tmp_path / trained_on
        shutil.copytree(runs[trained_on], copy)
        saved = load_for_inference(copy).conversation()
        (copy / FILE).unlink()
        rebuilt = load_for_inference(copy).conversation()
        assert rebuilt.system_prompt == saved.system_prompt == expected_system
        assert rebuilt.stop_ids == saved.stop_ids and rebuilt.trained_format == saved.trained_format
        user = [{"role": "user", "content": PROMPT}]
        assert rebuilt.prompt_ids(user) == saved.prompt_ids(user)


def test_ollama_modelfile_stops_on_the_runs_stop_tokens_and_carries_the_system_prompt_training_used(runs, tmp_path):
    from lora_ft.export import export

    for trained_on in ("chat", "prompt"):
        out = export(runs[trained_on], "ollama", tmp_path / trained_on)
        lines = (out.out_dir / "Modelfile").read_text().splitlines()
        assert [line for line in lines if line.startswith(("PARAMETER", "SYSTEM"))] == ['PARAMETER stop "<|im_end|>"'] + (
            [f'SYSTEM """{SYSTEM}"""'] if trained_on == "prompt" else []
        )


@pytest.mark.parametrize("option, expected", [
    ([], f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"),  # the run's rule
    (["--system", "Be kind."], "<|im_start|>system\nBe kind.<|im_end|>\n"),  # the user's choice
    (["--system", ""], ""),  # explicitly none
])
def test_chat_system_option_overrides_the_runs_system_prompt(runs, option, expected, monkeypatch):
    from typer.testing import CliRunner

    from lora_ft.cli import app
    from lora_ft.generate import generate_file
    from lora_ft.serving import inference as gen

    inference = gen.load_for_inference(runs["prompt"])
    rendered = []
    original = gen.Inference.render
    monkeypatch.setattr(gen.Inference, "render", lambda self, *a, **k: rendered.append(original(self, *a, **k)) or rendered[-1])
    monkeypatch.setattr(gen, "load_for_inference", lambda *a, **k: inference)
    result = CliRunner().invoke(app, ["chat", "--adapter", str(runs["prompt"]), "--max-new-tokens", "1", *option],
                                input=PROMPT + "\n/exit\n")
    assert result.exit_code == 0, result.output
    assert inference.tokenizer().decode(rendered[0]) == f"{expected}<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
