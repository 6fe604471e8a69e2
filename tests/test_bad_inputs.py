"""Bad inputs, through the CLI: each exits 2 with exactly one line on stderr that names the problem,
and writes nothing. One row per case; most fail before any model weights load.

Unreadable files: the suite runs as root, for whom chmod 000 changes nothing, so 'unreadable' is
tested as a folder where a file is expected, and as bytes that are not the promised format.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import typer
import yaml

from conftest import copy_rows, hide_cuda, write_jsonl


@dataclass
class Env:
    tmp: Path
    model: Path
    cfg: dict

    def config(self, data: dict | None = None) -> Path:
        path = self.tmp / "config.yaml"
        path.write_text(yaml.safe_dump(self.cfg if data is None else data, sort_keys=False), encoding="utf-8")
        return path

    def data_file(self, content: str | bytes, name: str = "bad.jsonl") -> Path:
        path = self.tmp / "data" / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        self.cfg["data"]["train"] = str(path)
        return path

    def model_copy(self) -> Path:
        target = self.tmp / "model_copy"
        shutil.copytree(self.model, target)
        self.cfg["model"]["name"] = str(target)
        return target


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Env], list[str]]  # returns the CLI args after "train"
    expect: str  # must appear in the error line
    without_cuda: bool = False  # a refusal of what only a CUDA machine can do: the test hides any GPU the machine has


def key(dotted: str, value) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        node = env.cfg
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
        return [str(env.config())]

    build.dotted = dotted  # the key this case breaks (read by the coverage test below)
    return build


def drop(dotted: str) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        node = env.cfg
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        del node[last]
        return [str(env.config())]

    build.dotted = dotted
    return build


def raw_config(content: str | bytes) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        path = env.tmp / "config.yaml"
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return [str(path)]

    return build


def data(content: str | bytes, name: str = "bad.jsonl") -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        env.data_file(content, name)
        return [str(env.config())]

    return build


def rows(*items) -> str:
    return "".join(json.dumps(item) + "\n" for item in items)


def with_set(*overrides: str) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        args = [str(env.config())]
        for item in overrides:
            args += ["--set", item]
        return args

    return build


def custom(fn: Callable[[Env], None], breaks: str = "") -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        fn(env)
        return [str(env.config())]

    build.dotted = breaks
    return build


# --- model folders that are not models -------------------------------------------------------


def _model_not_a_folder(env: Env):
    env.cfg["model"]["name"] = str(env.tmp / "no_such_model")


def _model_without_config(env: Env):
    folder = env.tmp / "empty_model"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a model")
    env.cfg["model"]["name"] = str(folder)


def _model_config_garbage(env: Env):
    target = env.model_copy()
    (target / "config.json").write_text("{ this is not json")


def _model_config_unknown_type(env: Env):
    target = env.model_copy()
    config = json.loads((target / "config.json").read_text())
    config["model_type"] = "no-such-architecture"
    (target / "config.json").write_text(json.dumps(config))


def _tokenizer_without_pad_or_eos(env: Env):
    target = env.model_copy()
    tokenizer_config = json.loads((target / "tokenizer_config.json").read_text())
    for name in ("pad_token", "eos_token"):
        tokenizer_config.pop(name, None)
    (target / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    config = json.loads((target / "config.json").read_text())
    config.pop("eos_token_id", None)
    config.pop("pad_token_id", None)
    (target / "config.json").write_text(json.dumps(config))


def _tokenizer_missing(env: Env):
    target = env.model_copy()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (target / name).unlink()


def _pickle_only_weights(env: Env):
    import torch
    from safetensors.torch import load_file

    target = env.model_copy()
    weights = load_file(str(target / "model.safetensors"))
    (target / "model.safetensors").unlink()
    torch.save(weights, target / "pytorch_model.bin")


def _data_is_a_folder(env: Env):
    folder = env.tmp / "data" / "folder.jsonl"
    folder.mkdir(parents=True)
    env.cfg["data"]["train"] = str(folder)


def _eval_broken(env: Env):
    path = env.tmp / "data" / "eval.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    env.cfg["data"]["eval"] = str(path)


def _eval_and_fraction(env: Env):
    env.cfg["data"]["eval"] = env.cfg["data"]["train"]
    env.cfg["data"]["eval_fraction"] = 0.1


def _output_is_a_file(env: Env):
    target = env.tmp / "out_file"
    target.write_text("I am a file")
    env.cfg["output_dir"] = str(target)


def _output_is_the_data_folder(env: Env):
    env.cfg["output_dir"] = str(Path(env.cfg["data"]["train"]).parent)


def _output_contains_the_data_with_overwrite(env: Env):
    # A finished-looking run folder that also holds the training data: --overwrite must not delete it.
    out = env.tmp / "runs" / "old"
    out.mkdir(parents=True)
    (out / "manifest.json").write_text("{}")
    data_file = out / "train.jsonl"
    write_jsonl(data_file, copy_rows(8))
    env.cfg["data"]["train"] = str(data_file)
    env.cfg["output_dir"] = str(out)


def _output_holds_a_finished_run(env: Env):
    out = env.tmp / "runs" / "done"
    out.mkdir(parents=True)
    (out / "manifest.json").write_text("{}")
    env.cfg["output_dir"] = str(out)


def _output_is_the_model_folder(env: Env):
    env.cfg["output_dir"] = env.cfg["model"]["name"]


def _config_is_a_folder(env: Env) -> list[str]:
    folder = env.tmp / "folder.yaml"
    folder.mkdir()
    return [str(folder)]


def _missing_config(env: Env) -> list[str]:
    return [str(env.tmp / "nope.yaml")]


def _template_missing(env: Env):
    env.cfg["model"]["chat_template"] = str(env.tmp / "missing.jinja")


CASES = [
    # --- config file itself
    Case("config file missing", _missing_config, "config file not found"),
    Case("config path is a folder", _config_is_a_folder, "config file not found"),
    Case("empty YAML", raw_config(""), "the file is empty"),
    Case("YAML is a list", raw_config("- model\n- data\n"), "top level must be a mapping"),
    Case("YAML is a scalar", raw_config("just text\n"), "top level must be a mapping"),
    Case("YAML syntax error", raw_config("model: {name: [unclosed\n"), "not valid YAML"),
    Case("YAML tab indentation", raw_config("model:\n\tname: x\n"), "not valid YAML"),
    Case("non-UTF-8 YAML", raw_config(b"model:\n  name: caf\xe9\n"), "not UTF-8"),
    Case("YAML python tag (unsafe loader bait)", raw_config("model: !!python/object/apply:os.system ['true']\n"), "not valid YAML"),
    # --- unknown keys and wrong shapes
    Case("unknown top-level key", key("optimizer_settings", {"lr": 1}), "optimizer_settings: unknown key"),
    Case("unknown training key", key("training.learnin_rate", 0.1), "did you mean 'learning_rate'"),
    Case("PEFT synonym r", key("lora.r", 8), "did you mean 'rank'"),
    Case("key in the wrong section", key("lora.learning_rate", 0.1), "training.learning_rate"),
    Case("section is a list", key("training", [1, 2]), "training"),
    Case("data is a number", key("data", 42), "data"),
    Case("model section missing", drop("model"), "model: required key is missing"),
    Case("model.name missing", drop("model.name"), "model.name: required key is missing"),
    Case("data.train missing", drop("data.train"), "data.train: required key is missing"),
    # --- wrong types and impossible values
    Case("max_steps not a number", key("training.max_steps", "ten"), "training.max_steps"),
    Case("max_steps zero", key("training.max_steps", 0), "training.max_steps"),
    Case("max_steps negative", key("training.max_steps", -5), "training.max_steps"),
    Case("max_steps fractional", key("training.max_steps", 2.5), "training.max_steps"),
    Case("learning rate above 1", key("training.learning_rate", 5), "training.learning_rate"),
    Case("learning rate zero", key("training.learning_rate", 0), "training.learning_rate"),
    Case("batch size zero", key("training.batch_size", 0), "training.batch_size"),
    Case("epochs zero", key("training.epochs", 0), "training.epochs"),
    Case("warmup ratio above 1", key("training.warmup_ratio", 1.5), "training.warmup_ratio"),
    Case("max_seq_length tiny", key("training.max_seq_length", 4), "training.max_seq_length"),
    Case("rank zero", key("lora.rank", 0), "lora.rank"),
    Case("alpha negative", key("lora.alpha", -1), "lora.alpha"),
    Case("dropout above 1", key("lora.dropout", 1.5), "lora.dropout"),
    Case("target preset unknown", key("lora.target_modules", "everything"), "lora.target_modules"),
    Case("target list empty", key("lora.target_modules", []), "lora.target_modules"),
    Case("target module not in model", key("lora.target_modules", ["c_attn"]), "c_attn not in this model"),
    Case("precision unknown", key("training.precision", "fp8"), "training.precision"),
    Case("fp16 on a CPU", key("training.precision", "fp16"), "fp16 needs a CUDA GPU", without_cuda=True),
    Case("4-bit on a CPU", key("model.quantization", {"bits": 4, "compute_dtype": "float32"}), "needs a CUDA GPU", without_cuda=True),
    Case("liger insisted on a CPU", key("training.liger", True), "training.liger: true needs CUDA", without_cuda=True),
    Case("Triton kernels insisted on a CPU", key("training.lora_kernels", "triton"), "training.lora_kernels: triton needs CUDA", without_cuda=True),
    Case("lora_kernels unknown", key("training.lora_kernels", "cuda"), "training.lora_kernels"),
    Case("optimizer unknown", key("training.optimizer", "adam"), "training.optimizer"),
    Case("scheduler unknown", key("training.lr_scheduler", "exponential"), "training.lr_scheduler"),
    Case("nan_policy unknown", key("training.nan_policy", "ignore"), "training.nan_policy"),
    Case("max_skipped_steps negative", key("training.max_skipped_steps", -1), "training.max_skipped_steps"),
    Case("trust_remote_code not a bool", key("model.trust_remote_code", "maybe"), "model.trust_remote_code"),
    Case("allow_pickle_weights not a bool", key("model.allow_pickle_weights", "perhaps"), "model.allow_pickle_weights"),
    Case("report_to unknown tracker", key("training.report_to", ["slack"]), "training.report_to"),
    Case("model dtype unknown", key("model.dtype", "float8"), "model.dtype"),
    Case("bf16 and fp16 both true", custom(lambda e: e.cfg["training"].update(bf16=True, fp16=True)), "bf16 and fp16"),
    Case("early stopping without eval_steps", key("training.early_stopping_patience", 2), "needs training.eval_steps"),
    Case("eval_fraction 1", key("data.eval_fraction", 1.0), "data.eval_fraction"),
    Case("eval file and eval_fraction", custom(_eval_and_fraction), "not both"),
    Case("data format unknown", key("data.format", "xml"), "data.format"),
    Case("train_on unknown", key("data.train_on", "prompts"), "data.train_on"),
    # --- --set overrides
    Case("--set without =", with_set("training.max_steps"), "expected dotted.key=value"),
    Case("--set empty key", with_set("=3"), "empty key"),
    Case("--set wrong type", with_set("training.max_steps=abc"), "training.max_steps"),
    Case("--set into a scalar", with_set("lora.rank.size=3"), "rank is not a section"),
    Case("--set unknown key", with_set("training.colour=blue"), "training.colour: unknown key"),
    # --- data files
    Case("data file missing", key("data.train", "/nonexistent/train.jsonl"), "data file not found"),
    Case("data path is a folder", custom(_data_is_a_folder), "is not a file"),
    Case("empty data file", data(""), "no rows"),
    Case("only blank lines", data("\n\n   \n"), "no rows"),
    Case("broken JSON line", data(rows({"prompt": "a", "completion": "b"}) + '{"prompt": "x", \n'), "bad.jsonl:2: not valid JSON"),
    Case("JSON line is a list", data("[1, 2, 3]\n"), "must be a JSON object"),
    Case("non-UTF-8 data", data(b'{"prompt": "caf\xe9", "completion": "x"}\n'), "not UTF-8"),
    Case("unsupported data suffix", data("hello\n", name="train.txt"), "unsupported file type"),
    Case("rows of no known format", data(rows({"question": "a", "answer": "b"})), "bad.jsonl"),
    Case("prompt is a number", data(rows({"prompt": 3, "completion": "b"})), "must be a string"),
    Case("prompt empty", data(rows({"prompt": " ", "completion": "b"})), "field 'prompt' is empty"),
    Case("every row truncated before its answer", lambda e: data(rows(*[{"prompt": "word " * 40, "completion": "b"}] * 3))(e) + ["--set", "training.max_seq_length=8"], "no row has a token to learn from"),
    Case("chat role unknown", data(rows({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]})), "role 'robot'"),
    Case("chat without assistant", data(rows({"messages": [{"role": "user", "content": "x"}]})), "no assistant message"),
    Case("chat messages not a list", data(rows({"messages": "hello"})), "'messages' must be a non-empty list"),
    Case("JSON file not a list", data('{"prompt": "a"}', name="bad.json"), "expected a JSON list"),
    Case("CSV ragged row", data("prompt,completion\na,b\nc,d,e\n", name="bad.csv"), "fields where the header has 2"),
    Case("parquet that is not parquet", data(b"PAR1 garbage", name="bad.parquet"), "not a readable Parquet file"),
    Case("broken eval file", custom(_eval_broken), "eval.jsonl:2: not valid JSON"),
    # --- model paths that are not models
    Case("model folder missing", custom(_model_not_a_folder), "does not exist or is not a folder"),
    Case("folder without config.json", custom(_model_without_config), "not a model folder (no config.json)"),
    Case("config.json not JSON", custom(_model_config_garbage), "model.name"),
    Case("unknown architecture", custom(_model_config_unknown_type), "model.name"),
    Case("tokenizer files missing", custom(_tokenizer_missing), "model.name"),
    Case("tokenizer with neither pad nor eos", custom(_tokenizer_without_pad_or_eos), "neither a pad nor an EOS token"),
    Case("pickle-only weights", custom(_pickle_only_weights), "only pickle weights (pytorch_model.bin)"),
    Case("gguf file missing", key("model.name", "/nonexistent/model.gguf"), "GGUF file not found"),
    Case("package not installed", key("model.name", "pkg://no_such_package_xyz/m.gguf"), "is not installed"),
    Case("chat template file missing", custom(_template_missing), "model.chat_template: file not found"),
    Case("chat template name unknown", key("model.chat_template", "klingon"), "neither a built-in"),
    # --- output paths
    Case("unknown deployment target", key("serving.deployment", "tgi"), "serving.deployment"),
    Case("unknown distributed strategy", key("distributed.strategy", "zero9"), "distributed.strategy"),
    Case("unknown advice rule", key("advice.off", ["lr"]), "advice.off.0"),
    Case("negative DPO beta", key("preference.dpo.beta", -1), "preference.dpo.beta"),
    Case("output_dir is a file", custom(_output_is_a_file, breaks="output_dir"), "is a file"),
    Case("output_dir is the data folder", custom(_output_is_the_data_folder), "contains the run's input"),
    Case("output_dir is the model folder", custom(_output_is_the_model_folder), "contains the run's input"),
    Case("--overwrite would delete the data", lambda e: custom(_output_contains_the_data_with_overwrite)(e) + ["--overwrite"], "contains the run's input"),
    Case("output_dir holds a finished run", custom(_output_holds_a_finished_run), "holds a finished run"),
    Case("--resume with nothing to resume", lambda e: [str(e.config()), "--resume"], "holds no unfinished run"),
]


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tmp_path, tiny_model_dir, tiny_config, run_cli,
                                                            monkeypatch):
    if case.without_cuda:
        hide_cuda(monkeypatch)
    env = Env(tmp_path, tiny_model_dir, copy.deepcopy(tiny_config))
    (tmp_path / "data").mkdir()
    train_file = write_jsonl(tmp_path / "data" / "train.jsonl", copy_rows(8))
    env.cfg["data"] = {"train": str(train_file)}
    env.cfg["output_dir"] = str(tmp_path / "out")
    args = case.build(env)
    before = _snapshot(tmp_path)

    code, _, err = run_cli("train", *args)

    # Warnings (e.g. from the data checks) may precede it; the failure itself is exactly one error line.
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert case.expect in lines[0], lines[0]
    assert "Traceback" not in err
    assert _snapshot(tmp_path) == before, "the failed run wrote or removed something"
    assert not (tmp_path / "out").exists()


def test_the_battery_breaks_a_key_of_every_config_section_and_names_each_case_once():
    """A new config section (or a renamed one) without a bad-input case here fails this test."""
    from lora_ft.config import RunConfig

    sections = set(RunConfig.model_fields)
    broken = {getattr(case.build, "dotted", "").split(".")[0] for case in CASES}
    assert sections - broken == set(), f"no bad-input case breaks a key of: {sorted(sections - broken)}"
    assert len({case.name for case in CASES}) == len(CASES), "two cases share a name"


# ---------------------------------------------------------------------------------------------
# validate and train answer alike: one pre-flight, printed by validate, run by train


def _template_without_end_of_turn(env: Env):
    template = env.tmp / "no_end.jinja"
    template.write_text(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    env.cfg["model"]["chat_template"] = str(template)


def _end_of_turn_missing_but_warn(env: Env):
    _template_without_end_of_turn(env)
    env.cfg["data"]["checks"] = {"end_of_turn": "warn"}


# Inputs on the edge that train accepts: validate must accept them too (both were refused by train alone before).
GOOD = [
    Case("end of turn missing, its check set to warn", custom(_end_of_turn_missing_but_warn), ""),
    Case("a finished run with --overwrite", lambda e: custom(_output_holds_a_finished_run)(e) + ["--overwrite"], ""),
]
BAD_ONLY_TRAIN_SAW = [
    Case("end of turn missing (check at fail)", custom(_template_without_end_of_turn), "no end-of-turn token"),
]


@pytest.mark.parametrize("case", CASES + BAD_ONLY_TRAIN_SAW + GOOD, ids=[c.name for c in CASES + BAD_ONLY_TRAIN_SAW + GOOD])
def test_validate_exits_2_exactly_when_train_does(case, tmp_path, tiny_model_dir, tiny_config, run_cli, monkeypatch):
    import lora_ft.train as train_module

    if case.without_cuda:
        hide_cuda(monkeypatch)
    env = Env(tmp_path, tiny_model_dir, copy.deepcopy(tiny_config))
    (tmp_path / "data").mkdir()
    env.cfg["data"] = {"train": str(write_jsonl(tmp_path / "data" / "train.jsonl", copy_rows(8)))}
    env.cfg["output_dir"] = str(tmp_path / "out")
    args = case.build(env)

    def past_preflight(*args, **kwargs):  # train stops where it would start loading weights: exit 0
        raise typer.Exit(0)

    monkeypatch.setattr(train_module, "_run", past_preflight)
    validate_code, _, validate_err = run_cli("validate", *args)
    train_code, _, train_err = run_cli("train", *args)

    assert validate_code == train_code, f"validate {validate_code}: {validate_err!r}; train {train_code}: {train_err!r}"
    assert validate_code == (0 if case in GOOD else 2)
    if case.expect:
        assert case.expect in validate_err.strip().splitlines()[-1]
