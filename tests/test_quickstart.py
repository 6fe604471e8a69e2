"""The real quickstart model (SmolLM2-135M-Instruct, GGUF from PyPI): a short run learns the task and stops.

One short training (module-scoped, ~1-2 minutes on 2 CPU cores) serves every assertion here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lora_ft.config_io import load_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _rows(name: str, n: int) -> list[dict]:
    lines = (REPO / "recipes" / "data" / name).read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory, quickstart_gguf):
    from conftest import write_jsonl
    from lora_ft.train import train

    folder = tmp_path_factory.mktemp("quickstart")
    overrides = [
        f"data.train={write_jsonl(folder / 'train.jsonl', _rows('quickstart_train.jsonl', 64))}",
        f"data.eval={write_jsonl(folder / 'eval.jsonl', _rows('quickstart_eval.jsonl', 8))}",
        "training.max_steps=16",
        "training.logging_steps=4",
        f"output_dir={folder / 'run'}",
    ]
    cfg = load_config(REPO / "recipes" / "quickstart.yaml", overrides)
    return cfg, train(cfg)


def test_quickstart_heldout_loss_falls_well_below_the_base(quickstart_run):
    _, result = quickstart_run
    base, adapter = result.scores["base"]["loss"], result.scores["adapter"]["loss"]
    assert base > 1.0  # the base model does not do this task yet
    assert adapter < 0.5 * base


def test_quickstart_answers_follow_the_task_and_stop(quickstart_run, capfd):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from lora_ft.model.loading import load_base_model, resolve_model_source

    cfg, result = quickstart_run
    tokenizer = AutoTokenizer.from_pretrained(result.run_dir)
    generation = GenerationConfig.from_pretrained(result.run_dir)
    capfd.readouterr()
    base = load_base_model(cfg.model, resolve_model_source(cfg.model), "fp32")
    loading = capfd.readouterr()
    assert "de-quantizing" not in loading.err and "Loading weights" not in loading.err, "no transformers bars on load"
    model = PeftModel.from_pretrained(base, result.run_dir).eval()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row in _rows("quickstart_eval.jsonl", 3):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**prompt, generation_config=generation, max_new_tokens=64)
        new = out[0, prompt["input_ids"].shape[1]:].tolist()
        assert new[-1] == im_end and len(new) < 64, "stops at the end-of-turn token"
        answer = json.loads(tokenizer.decode(new, skip_special_tokens=True))
        assert set(answer) == {"title", "day", "time", "place"}
        assert answer["day"] == json.loads(row["completion"])["day"]


def test_the_model_cards_code_loads_the_pkg_base_from_its_real_file(quickstart_run, quickstart_gguf):
    import re

    from peft import PeftModel

    _, result = quickstart_run
    card = (result.run_dir / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)
    assert "pkg://" not in code and f"gguf_file='{quickstart_gguf.name}'" in code
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the snippet a user copies
    assert isinstance(scope["model"], PeftModel)


def test_a_template_without_end_of_turn_is_refused_before_training(tmp_path, run_cli):
    broken = tmp_path / "no_end.jinja"
    broken.write_text(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    code, _, err = run_cli(
        "train", REPO / "recipes" / "quickstart.yaml", "--set", f"model.chat_template={broken}",
        "--set", f"output_dir={tmp_path / 'run'}",
    )
    assert code == 2
    assert "no end-of-turn token" in err
    assert not (tmp_path / "run").exists()
