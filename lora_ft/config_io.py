"""The config's files: read a YAML config (with `dotted.key=value` overrides) into the typed `RunConfig`, turn
pydantic's errors into one line per problem naming the key and a did-you-mean, write a run's config back with
secrets redacted, and generate configs/reference.yaml from the schema's fields (`python -m lora_ft.config_io`).
The schema itself is config.py."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from lora_ft.config import DataSource, DataSpec, RunConfig
from lora_ft.errors import ConfigError
from lora_ft.yaml_io import load_yaml


# Names users bring from other tools (PEFT, TRL, axolotl, HF Trainer) -> our key.
SYNONYMS: dict[str, str] = {
    "r": "rank",
    "lora_r": "rank",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lora_target_modules": "target_modules",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size",
    "lr": "learning_rate",
    "lr_scheduler_type": "lr_scheduler",
    "optim": "optimizer",
    "max_length": "max_seq_length",
    "sequence_len": "max_seq_length",
    "model_name_or_path": "name",
    "base_model": "name",
    "torch_dtype": "dtype",
    "dataset": "train",
    "train_file": "train",
    "eval_file": "eval",
    "val_set_size": "eval_fraction",
    "load_in_4bit": "quantization",
}

# Keys that exist, but in another section.
MOVED: dict[str, str] = {
    "max_seq_length": "training.max_seq_length",
    "seed": "training.seed",
    "learning_rate": "training.learning_rate",
    "packing": "data.packing",
    "output_dir": "output_dir (top level)",
    "chat_template": "model.chat_template",
    "quantization": "model.quantization",
}


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config, apply `dotted.key=value` overrides, validate. Raises ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"), path)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the config as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{where}: not valid YAML ({problem})") from None
    if raw is None:
        raise ConfigError(f"{path}: the file is empty; start from configs/reference.yaml")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, lora:, data:, training:)")
    for item in overrides:
        apply_override(raw, item)
    cfg = validate_dict(raw, source=str(path))
    if cfg.output_dir is None:
        cfg = cfg.model_copy(update={"output_dir": str(Path("runs") / path.stem)})
    return cfg


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as a YAML scalar (so types are checked later)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. --set training.max_steps=10")
    key, _, text = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = load_yaml(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def validate_dict(raw: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        # One line per key: a union field reports once per branch, the first is the useful one.
        by_key: dict[str, str] = {}
        for err in exc.errors():
            key, line = _explain(err)
            by_key.setdefault(key, line)
        raise ConfigError("\n".join(f"{source}: {line}" for line in by_key.values())) from None


def _explain(err: dict) -> tuple[str, str]:
    loc = [str(p) for p in err["loc"] if not _is_union_tag(p)]
    key = ".".join(loc) or "(top level)"
    return key, _describe(err, loc, key)


def _describe(err: dict, loc: list[str], key: str) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key; {_suggest(loc)}"
    if kind == "missing":
        return f"{key}: required key is missing"
    msg = err["msg"]
    msg = re.sub(r"^(Value error|Assertion failed), ", "", msg)
    value = err.get("input")
    shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r})"
    if kind.startswith("literal_error"):
        return f"{key}: {msg.replace('Input should be', 'should be')}{shown}"
    return f"{key}: {msg[0].lower() + msg[1:]}{shown}"


def _is_union_tag(part) -> bool:
    # pydantic puts the union branch in the location ("list[str]", "literal['all-linear',...]").
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "DataSource"))


def _section_fields(loc: list[str]) -> list[str]:
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        if field is None:
            return []
        inner = _spec_type(field.annotation)
        if inner is None:
            return []
        model = inner
    return list(model.model_fields)


def _spec_type(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _spec_type(arg)
        if found is not None:
            return found
    return None


def _suggest(loc: list[str]) -> str:
    name = loc[-1]
    fields = _section_fields(loc)
    section = ".".join(loc[:-1]) or "the top level"
    if name in SYNONYMS and SYNONYMS[name] in fields:
        return f"did you mean '{SYNONYMS[name]}'?"
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    if name in MOVED:
        return f"it belongs at {MOVED[name]}"
    if name in SYNONYMS and SYNONYMS[name] in MOVED:
        return f"use {MOVED[SYNONYMS[name]]}"
    return f"keys allowed in {section}: {', '.join(fields)}"


def config_to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML, secrets redacted, for the run folder."""
    return yaml.safe_dump(redact(cfg.model_dump(mode="json")), sort_keys=False)


# Whole key names (or their last _part): hf_token, hub_token, api_key, password... but not max_new_tokens.
SECRET_KEY = re.compile(r"(^|_)(token|secret|password|passwd|api[_-]?key|apikey|credentials?)$", re.I)
SECRET_VALUE = re.compile(r"(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9]{20,}|://[^/\s:@]+:[^/\s@]+@)")


def redact(value: Any, key: str = "") -> Any:
    """Replace secret-looking keys and values (Hub tokens, API keys, passwords in URLs) with '***'."""
    if isinstance(value, dict):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        if SECRET_KEY.search(key) and value:
            return "***"
        return SECRET_VALUE.sub("***", value)
    return value


def reference_yaml() -> str:
    """Every key with its default and its one-line doc (configs/reference.yaml; a test keeps it in sync)."""
    lines = [
        "# Every loraft config key, its default and what it does. Generated from lora_ft/config.py:",
        "#   python -m lora_ft.config_io > configs/reference.yaml",
        "# model.name and data.train are required; everything else may be left out.",
    ]
    _reference_section(RunConfig, 0, lines)
    return "\n".join(lines) + "\n"


def _reference_section(model: type[BaseModel], indent: int, lines: list[str]) -> None:
    pad = "  " * indent
    for name, field in model.model_fields.items():
        nested = _spec_type(field.annotation)
        doc = field.description or ""
        if nested is not None and nested is not DataSource:
            block: list[str] = [f"{pad}{name}:" + (f"  # {doc}" if doc else "")]
            _reference_section(nested, indent + 1, block)
            # An optional section that is off by default (quantization) is shown commented out.
            off = not field.is_required() and field.default is None and nested is not DataSpec
            lines.extend(f"{pad}# {line[len(pad):]}" for line in block) if off else lines.extend(block)
            continue
        if field.is_required():
            value = "REQUIRED"
        else:
            default = field.get_default(call_default_factory=True)
            value = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        lines.append(f"{pad}{name}: {value}" + (f"  # {doc}" if doc else ""))


if __name__ == "__main__":  # pragma: no cover
    print(reference_yaml(), end="")
