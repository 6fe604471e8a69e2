"""A run folder (or any PEFT adapter folder) as every later stage reads it, and an adapter put on a live model.

`AdapterRun.load` checks the folder once (adapter_config.json parsed and its weights' ranks checked by
artifacts/adapter.py, the manifest and config.yaml read when loraft wrote them); merge, export, eval, inspect,
chat, generate and serve then ask it for the tokenizer, the weights and the base. Pitfall guarded: an adapter
put on a base it was not trained on, which gives garbage without an error: `resolve_base` and `check_base`
compare the base's fingerprint with the one recorded (or, for a foreign adapter, the base it names).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

from transformers import AutoTokenizer

from lora_ft.artifacts.adapter import (
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterConfig, AdapterWeights, group_state, read_state, read_weights,
)
from lora_ft.artifacts.fingerprint import fingerprint_model_path
from lora_ft.artifacts.manifests import RunManifest, read_manifest
from lora_ft.artifacts.run_dir import CONFIG, MANIFEST, STATE
from lora_ft.config import ModelSpec
from lora_ft.config_io import validate_dict
from lora_ft.errors import LoraftError
from lora_ft.model.loading import resolve_model_source
from lora_ft.yaml_io import load_yaml


class AdapterRun:
    """What a finished run folder (or any PEFT adapter folder) tells later stages: adapter config, manifest, config.

    Used by merge, export, eval, inspect, chat, generate and serve, so they all read a run the same way.
    """

    def __init__(self, path: Path, adapter: AdapterConfig, manifest, config):
        self.path = path
        self.adapter = adapter
        self.manifest = manifest  # RunManifest, or None for a foreign adapter
        self.config = config  # RunConfig, or None for a foreign adapter
        self._named_base: tuple[str | None, str] | None = None

    @property
    def adapter_config(self) -> dict:
        """adapter_config.json as written (read `adapter` for the checked values)."""
        return dict(self.adapter.raw)

    @classmethod
    def load(cls, adapter_dir: str | Path, what: str = "--adapter") -> "AdapterRun":
        path = Path(adapter_dir).expanduser()
        if not path.is_dir():
            raise LoraftError(f"{what}: {path} is not a folder")
        if not (path / ADAPTER_CONFIG).is_file():
            hint = " (the run has not finished; resume it with loraft train CONFIG --resume)" if (path / STATE).exists() else ""
            raise LoraftError(f"{what}: {path} holds no {ADAPTER_CONFIG}{hint}")
        adapter = AdapterConfig.read(path)
        _, state = read_state(path, what)  # safetensors only, intact, and (below) every rank as the config says
        if not adapter.target_parameters:
            weights = group_state(state, adapter, None, str(path / ADAPTER_WEIGHTS))
            if not weights.factors and not weights.token_rows:
                raise LoraftError(f"{what}: {path / ADAPTER_WEIGHTS} holds no LoRA weights; is it a LoRA adapter?")
        del state
        manifest = read_manifest(path, RunManifest) if (path / MANIFEST).is_file() else None
        config = None
        if (path / CONFIG).is_file():
            raw = load_yaml((path / CONFIG).read_text(encoding="utf-8"), path / CONFIG)
            config = validate_dict(raw, source=str(path / CONFIG))
        return cls(path.resolve(), adapter, manifest, config)

    def tokenizer(self):
        """The tokenizer saved in the run folder: the chat template exactly as trained (pad = EOS when it has none)."""
        if not (self.path / "tokenizer_config.json").is_file():
            raise LoraftError(f"--adapter: {self.path} holds no tokenizer files; it was not written by loraft train")
        tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def weights(self, wrappers: Mapping | None = None, what: str = "--adapter") -> AdapterWeights:
        return read_weights(self.path, self.adapter, wrappers, what)

    @property
    def base_name(self) -> str:
        """The base model the adapter was trained on, as the user named it."""
        if self.manifest is not None:
            return self.manifest.base_model.name
        return self.adapter.base_model or ""

    @property
    def base_fingerprint(self) -> str | None:
        """None for a foreign adapter (no manifest): nothing to compare the base with."""
        return self.manifest.base_model.fingerprint if self.manifest is not None else None

    @property
    def trained_quantization(self):
        """The QuantizationSpec training loaded the base with; None for a full-precision or foreign adapter."""
        return self.manifest.base_model.quantization if self.manifest is not None else None

    def resolve_base(self, base: str | None, *, force: bool = False, as_trained: bool = False):
        """Find the base model (default: the one the adapter names) and refuse one whose weights differ from the
        adapter's base: the fingerprint in manifest.json, or without a manifest the base adapter_config.json names
        (when it can be found here; when it cannot, --force is needed to use another base).

        The base loads in full precision (what merge, export and serve compute on) unless `as_trained`: then a
        QLoRA run's base is quantized again exactly as training saw it (what the train summary measured).

        Returns (ModelSpec, ModelSource, fingerprint_matches: bool | None).
        """
        name = base or self.base_name
        if not name:
            raise LoraftError("--base: the adapter records no base model; pass --base MODEL")
        if self.config is not None and name == self.config.model.name:
            spec = self.config.model if as_trained else self.config.model.model_copy(update={"quantization": None})
        else:
            spec = ModelSpec(name=name)
        source = resolve_model_source(spec)
        if self.manifest is None and name == self.adapter.base_model:
            return spec, source, None  # the base the adapter names, and nothing recorded to compare it with
        expected, why = self.expected_base()
        if expected is None:
            if not force:
                raise LoraftError(f"--base: {self.path} has no {MANIFEST} and {why}, so {name} cannot be checked against "
                                  "it (an adapter on another base gives garbage); pass --force to use it anyway")
            return spec, source, None
        actual = fingerprint_model_path(source.path, source.gguf_file)
        if actual != expected:
            if not force:
                raise LoraftError(
                    f"--base: {name} is not the model this adapter was trained on (fingerprint {actual} != {why} "
                    f"{expected}); an adapter on another base gives garbage. Pass the right base, or --force to proceed anyway"
                )
            return spec, source, False
        return spec, source, True

    def expected_base(self) -> tuple[str | None, str]:
        """(fingerprint of the base the adapter was trained on, where it comes from); None when it cannot be known."""
        if self.manifest is not None:
            return self.manifest.base_model.fingerprint, "recorded"
        if self._named_base is None:
            self._named_base = self._fingerprint_named_base()
        return self._named_base

    def _fingerprint_named_base(self) -> tuple[str | None, str]:
        named = self.adapter.base_model
        if not named:
            return None, f"its {ADAPTER_CONFIG} names no base model"
        try:
            source = resolve_model_source(ModelSpec(name=named))
            return fingerprint_model_path(source.path, source.gguf_file), f"that of {named} (the base its {ADAPTER_CONFIG} names)"
        except LoraftError:
            return None, f"the base its {ADAPTER_CONFIG} names ({named}) cannot be found here"

    def check_base(self, served: str, fingerprint: str | None, *, force: bool = False, what: str = "--adapter") -> None:
        """Refuse to put this adapter on a running base (fingerprint `fingerprint`) it was not trained on."""
        if fingerprint is None or force:
            return
        expected, why = self.expected_base()
        if expected is None:
            raise LoraftError(f"{what}: {self.path} has no {MANIFEST} and {why}, so it cannot be checked against this "
                              f"server's base {served} (an adapter on another base gives garbage)")
        if expected != fingerprint:
            raise LoraftError(
                f"{what}: {self.path} was trained on another base ({self.base_name}, fingerprint {expected}); this "
                f"server's base is {served} (fingerprint {fingerprint}). An adapter on another base gives garbage: "
                "serve it with its own base"
            )


# ---------------------------------------------------------------------------------------------
# Loading onto a live model (serve, generate, eval, chat): names, fit, and undo


_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_adapter_name(name: str, what: str = "lora_name") -> None:
    """An adapter name is letters, digits, '-' and '_' (PEFT puts it inside module paths, where a dot or a
    slash would address another module)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise LoraftError(f"{what}: adapter name {name!r} may hold only letters, digits, '-' and '_' (1 to 64 of them); "
                          "choose another (e.g. app-v2)")


def fits_model(run: AdapterRun, model, what: str = "--adapter") -> None:
    """Every adapted module of the run exists in `model` with the adapter's shape: checked before PEFT touches
    the model, so that a wrong adapter is refused instead of half-loaded."""
    if run.adapter.target_parameters:
        return  # the fused expert layout is PEFT's own to check
    weights = run.weights(what=what)
    base = model.base_model.model if hasattr(model, "peft_config") else model
    for factors in weights.factors.values():
        try:
            layer = base.get_submodule(factors.module)
        except AttributeError:
            raise LoraftError(f"{what}: {run.path} adapts {factors.module}, which this base model does not have; "
                              "it was trained on another architecture") from None
        layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        weight = getattr(layer, "weight", None)
        want = (factors.A.shape[1], factors.B.shape[0]) if factors.transpose else (factors.B.shape[0], factors.A.shape[1])
        if weight is not None and weight.is_floating_point() and tuple(weight.shape) != tuple(want):
            raise LoraftError(f"{what}: {run.path} adapts {factors.module} as {list(want)}, but this base's weight is "
                              f"{list(weight.shape)}; it was trained on another base")


def remove_adapter(model, name: str):
    """Take adapter `name` off the model, whole or half-loaded, leaving every other adapter as it was; returns the
    model to use from now on (the plain base once no adapter is left: PEFT has no state for "no adapter")."""
    config = getattr(model, "peft_config", None)
    if config is None:  # a base that a failed first load had started to wrap: put its own layers back
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if hasattr(child, "get_base_layer") and hasattr(child, "base_layer"):
                    setattr(parent, child_name, child.get_base_layer())
        return model
    if name in config:
        model.delete_adapter(name)
    if not config:
        return model.base_model.unload()
    if any(active not in config for active in model.active_adapters):
        model.set_adapter(next(iter(config)))
    return model
