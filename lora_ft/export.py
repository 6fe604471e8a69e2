"""Export stage: a finished run -> what one serving engine loads, normalised so the engine's own rule
computes exactly the trained update, then read back and verified.

Reads the run folder (adapter, manifest, tokenizer) and the engine rule (serving/engines.py); writes --out:
PEFT folders for vllm/sglang/transformers, a LoRA GGUF for llamacpp (serving/gguf_lora.py writes and reads it;
+ a Modelfile for ollama), or the merged model. Normalisation: an integer lora_alpha where that is exact, else the scale folded into
lora_B; rsLoRA and per-module rank/alpha patterns folded for engines that ignore them; a base the target
can resolve (a pkg:// base becomes its real file path); no checkpoints. Verification: the written files
are re-read the way the engine reads them (its keys, names, layout and scaling formula), applied to the
base in fp32 and compared with PEFT base+adapter (1e-4); a mismatch exits 1 and leaves nothing at --out.
Pitfall guarded: an engine that loads an adapter without error and serves it at another scale.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

from lora_ft import __version__
from lora_ft.serving.engines import AdapterFeatures, EngineRule, check_target, gguf_arch, go_uint32, max_lora_rank, rule_for
from lora_ft.serving.gguf_lora import attention_heads, read_gguf, write_gguf
from lora_ft.errors import LoraftError, VerificationError
from lora_ft.artifacts.export_manifest import EXPORT_MANIFEST, EngineRuleRecord, ExportManifest, ExportVerification
from lora_ft.artifacts.adapter import ADAPTER_WEIGHTS, PEFT_PREFIX, AdapterConfig, ModuleFactors, read_state
from lora_ft.artifacts.adapter_run import AdapterRun
from lora_ft.artifacts.run_dir import MANIFEST, STATE, atomic_dir, atomic_write_json, file_sha256, partial_dir, require_new_out
from lora_ft.artifacts.locks import sweep_leftovers
from lora_ft.data.conversation import Conversation
from lora_ft.merge import merge
from lora_ft.model.loading import load_base_model, load_model_config

FP32_TOLERANCE = 1e-4  # as merge: fp32 arithmetic on both sides, only summation order differs
ADAPTER_GGUF = "adapter.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json")


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    manifest: ExportManifest

    def summary(self) -> str:
        m = self.manifest
        lines = [f"exported {m.run_dir} for {m.target} to {self.out_dir}"]
        if m.target == "merged":  # the folder is the whole model: no base to load beside it
            lines.append(f"model           {m.base_for_target} (base {m.base_model} with the adapter merged in)")
        else:
            lines.append(f"base            {m.base_for_target}" + (f" (recorded as {m.base_model})" if m.base_model != m.base_for_target else ""))
        if m.lora_alpha is not None:
            lines.append(f"adapter         lora_alpha {m.lora_alpha:g}, use_rslora {m.use_rslora}, "
                         f"{m.folded_modules} module(s) with the scale folded into lora_B")
        lines += [f"converted       {c}" for c in m.conversions]
        v = m.verification
        if v is not None:
            lines.append(f"verified        {v.method}: max |logit diff| {v.max_abs_diff:.3g} over {v.prompts} prompts "
                         f"({v.tokens} tokens), tolerance {v.tolerance:g}"
                         + (f"; the adapter moves logits by {v.adapter_effect:.3g}" if v.adapter_effect is not None else ""))
        if m.command:
            lines.append(f"serve           {m.command}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"out_dir": str(self.out_dir), "manifest": self.manifest.model_dump(mode="json")}


# ---------------------------------------------------------------------------------------------
# The stage


def export(run_dir: str | Path, target: str, out: str | Path, *, console=None) -> ExportResult:
    rule = rule_for(target)
    out = require_new_out(out)
    run = _finished_run(run_dir)
    sweep_leftovers(out, lambda line: (console or _stderr()).print(f"note: {line}", markup=False, highlight=False))
    weights_path, state = read_state(run.path, "RUN_DIR")
    features = AdapterFeatures.from_adapter_config(run.adapter, list(state))
    errors = [f for f in check_target(rule, features) if f.level == "error"]
    if errors:
        raise LoraftError(f"--to {target}: {errors[0].text}")
    spec, source, matches = run.resolve_base(None)
    if rule.layout == "merged":
        return _export_merged(run, rule, out, spec, source, matches)

    model_config = load_model_config(spec, source)
    base_for_target = source.display if source.gguf_file or Path(os.path.expanduser(spec.name)).exists() or spec.name.startswith("pkg://") else spec.name
    conversions: list[str] = []
    with atomic_dir(out) as staging:
        if rule.scaling == "peft":
            modules, alpha, rslora, folded = None, run.adapter.alpha, run.adapter.use_rslora, 0
            _write_peft_folder(staging, dict(run.adapter_config), None, base_for_target, run)
        else:
            modules, alpha, rslora, folded, conversions = normalise(rule, run.adapter, trained_modules(run))
            if rule.layout == "peft":
                _write_peft_folder(staging, dict(run.adapter_config), (modules, alpha, rslora), base_for_target, run)
            else:
                arch, permute = gguf_arch(model_config.model_type)
                if source.gguf_file is None:
                    conversions.append("the base is not a GGUF file: convert it with llama.cpp's convert_hf_to_gguf.py; "
                                       "the adapter's tensors are named as that converter names the base's")
                write_gguf(staging / ADAPTER_GGUF, modules, alpha, arch, attention_heads(model_config) if permute else None)
                if rule.name == "ollama":
                    _write_modelfile(staging, base_for_target, run)
        views = read_target(rule, staging, model_config, source)
        verification = verify(run, spec, source, views, staging if rule.scaling == "peft" else None, rule)
        manifest = ExportManifest(
            loraft_version=__version__,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            target=rule.name,
            rule=_rule_record(rule),
            run_dir=str(run.path),
            adapter_sha256=file_sha256(weights_path),
            base_model=spec.name,
            base_for_target=base_for_target,
            base_fingerprint_matches=matches,
            lora_alpha=float(alpha),
            use_rslora=rslora,
            folded_modules=folded,
            conversions=conversions,
            files={p.name: file_sha256(p) for p in sorted(staging.iterdir()) if p.is_file()},
            command=serve_command(rule, run, out.resolve(), base_for_target, model_config, modules),
            verification=verification,
        )
        atomic_write_json(staging / EXPORT_MANIFEST, manifest.model_dump(mode="json"))
        if rule.name == "vllm":
            (staging / "serve.sh").write_text(f"#!/bin/sh\n{manifest.command}\n", encoding="utf-8")
        _readable_by_all(staging)
    return ExportResult(out.resolve(), manifest)


def _stderr():
    return Console(stderr=True, soft_wrap=True)


def _finished_run(run_dir) -> AdapterRun:
    path = Path(run_dir).expanduser()
    if path.is_dir() and not (path / MANIFEST).is_file():
        hint = " (training has not finished; resume it with loraft train CONFIG)" if (path / STATE).is_file() else ""
        raise LoraftError(f"RUN_DIR: {path} is not a finished loraft run: no {MANIFEST}{hint}")
    return AdapterRun.load(path, "RUN_DIR")


def _rule_record(rule: EngineRule) -> EngineRuleRecord:
    return EngineRuleRecord(
        name=rule.name, source=rule.source, layout=rule.layout, scaling=rule.scaling,
        reads_keys=list(rule.reads_keys) if rule.reads_keys is not None else None,
        integer_alpha=rule.integer_alpha, max_rank=rule.max_rank, refuses=list(rule.refuses),
    )


def _readable_by_all(folder: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o755 & ~umask)
    for item in folder.iterdir():
        item.chmod((0o755 if item.name.endswith(".sh") else 0o644) & ~umask)


# ---------------------------------------------------------------------------------------------
# Normalisation: alpha and B such that the engine's formula gives the trained scale of every module


def trained_modules(run: AdapterRun) -> list[ModuleFactors]:
    """The run's LoRA pairs with the scale PEFT trained them under (rsLoRA and patterns included)."""
    weights = run.weights(what="RUN_DIR")
    if weights.replacements or weights.bias:
        raise LoraftError(f"RUN_DIR: {run.path} saves full tensors beside LoRA (e.g. {next(iter(weights.replacements or weights.bias))}); "
                          "deploy the merged model (--to merged)")
    modules = []
    for factors in weights.factors.values():
        if factors.transpose or factors.magnitude is not None:
            raise LoraftError(f"--to: {factors.module} is an embedding, Conv1D or DoRA update, which adapter engines cannot load; use --to merged")
        modules.append(factors)
    return modules


def normalise(rule: EngineRule, config: AdapterConfig, modules: list[ModuleFactors]) -> tuple[list[ModuleFactors], float, bool, int, list[str]]:
    """(modules with B folded where needed, alpha to write, use_rslora to write, modules folded, what was converted)."""
    r = config.rank
    rslora = config.use_rslora and rule.scaling == "alpha/r|rslora"
    # The alpha under which a module of the config's rank gets the trained global scale.
    wanted = config.alpha if rslora else config.scale * r
    conversions = []
    if config.use_rslora and not rslora:
        conversions.append(f"use_rslora: {rule.name} scales {rule.scaling}; alpha/sqrt(r) written as lora_alpha {wanted:g} (= alpha*sqrt(r))")
    alpha = float(round(wanted))
    if abs(wanted - alpha) > 1e-9 * max(1.0, abs(wanted)):
        alpha, rslora = float(r), False  # engine scale 1 (alpha/r = 1): the whole scale goes into B
        conversions.append(f"lora_alpha {wanted:g} is not an integer: lora_alpha {r} written and each scale folded into lora_B")
    out, folded = [], 0
    for m in modules:
        engine = rule.scale(alpha, r, m.rank, rslora)
        factor = m.scale / engine
        if factor != 1.0:
            out.append(m.with_b((m.B.float() * factor).to(m.B.dtype), engine))
            folded += 1
        else:
            out.append(m.with_b(m.B, engine))
    if config.has_patterns:
        conversions.append(f"rank_pattern/alpha_pattern: {rule.name} ignores them; each module's scale folded into its lora_B")
    return out, alpha, rslora, folded, conversions


# ---------------------------------------------------------------------------------------------
# Writers


def _write_peft_folder(folder: Path, config: dict, normalised, base_for_target: str, run: AdapterRun) -> None:
    config["base_model_name_or_path"] = base_for_target
    if normalised is None:
        shutil.copy2(run.path / ADAPTER_WEIGHTS, folder / ADAPTER_WEIGHTS)
    else:
        modules, alpha, rslora = normalised
        config.update(lora_alpha=int(alpha), use_rslora=rslora, rank_pattern={}, alpha_pattern={})
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
        tensors = {}
        for m in modules:
            tensors[f"{PEFT_PREFIX}{m.module}.lora_A.weight"] = m.A.contiguous()
            tensors[f"{PEFT_PREFIX}{m.module}.lora_B.weight"] = m.B.contiguous()
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    atomic_write_json(folder / "adapter_config.json", config)
    for name in TOKENIZER_FILES:  # the tokenizer and stop ids exactly as trained
        if (run.path / name).is_file():
            shutil.copy2(run.path / name, folder / name)


def _write_modelfile(folder: Path, base_gguf: str, run: AdapterRun) -> None:
    """Ollama: FROM the base GGUF, ADAPTER the adapter GGUF (relative to the Modelfile), the run's stop tokens, and
    the system prompt training used (Ollama's SYSTEM goes in front of a conversation without one: the run's rule)."""
    lines = [f"FROM {base_gguf}", f"ADAPTER ./{ADAPTER_GGUF}"]
    conversation = Conversation.read(run.path, None)
    if conversation is not None:
        lines += [f'PARAMETER stop "{token}"' for token in conversation.stop_tokens]
        if conversation.system_prompt and '"""' not in conversation.system_prompt:  # Ollama's quotes cannot escape """
            lines.append(f'SYSTEM """{conversation.system_prompt}"""')
    elif run.manifest is not None and run.manifest.chat.end_of_turn:  # a run saved before conversation.json
        lines.append(f'PARAMETER stop "{run.manifest.chat.end_of_turn}"')
    (folder / "Modelfile").write_text("\n".join(lines) + "\n", encoding="utf-8")


def serve_command(rule: EngineRule, run: AdapterRun, out: Path, base: str, model_config, modules) -> str | None:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", run.path.name) or "adapter"
    rank = max((m.rank for m in modules), default=run.adapter.rank) if modules else run.adapter.rank
    if rule.name == "vllm":
        tokenizer = f" --tokenizer {out}" if base.endswith(".gguf") else ""
        return f"vllm serve {base}{tokenizer} --enable-lora --lora-modules {name}={out} --max-lora-rank {max_lora_rank(rule, rank)}"
    if rule.name == "sglang":
        return f"python -m sglang.launch_server --model-path {base} --enable-lora --lora-paths {name}={out} --max-lora-rank {rank}"
    if rule.name == "llamacpp":
        base = base if base.endswith(".gguf") else "BASE.gguf"  # a folder base: convert_hf_to_gguf.py it first
        return f"llama-server -m {base} --lora {out / ADAPTER_GGUF}"
    if rule.name == "ollama":
        return f"ollama create {name.lower()} -f {out / 'Modelfile'} && ollama run {name.lower()}"
    return None


# ---------------------------------------------------------------------------------------------
# Readers: the written files as the engine reads them


def read_target(rule: EngineRule, folder: Path, model_config, source) -> list[ModuleFactors] | None:
    """What the engine will add to each base layer, read from `folder` under the engine's own rule
    (None for 'transformers': PEFT itself reads it)."""
    if rule.scaling == "peft":
        return None
    if rule.layout == "gguf":
        return read_gguf(folder / ADAPTER_GGUF, model_config, source)
    return read_peft(rule, folder)


def read_peft(rule: EngineRule, folder: Path) -> list[ModuleFactors]:
    """A PEFT folder as vLLM's PEFTHelper.from_dict / SGLang's LoRAConfig read it: only the keys they read,
    their refusals, their tensor-name rule and their scaling formula."""
    text = (folder / "adapter_config.json").read_text(encoding="utf-8")
    raw = json.loads(text)
    kept = {k: raw[k] for k in rule.reads_keys if k in raw}
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in kept:
            raise VerificationError(f"{rule.name}: adapter_config.json lacks {key}")
    if rule.integer_alpha:
        literal = re.search(r'"lora_alpha"\s*:\s*([^,}\s]+)', text)
        try:
            go_uint32(literal.group(1) if literal else "")
        except ValueError as exc:
            raise VerificationError(f"{rule.name}: {exc}") from None
    if kept.get("modules_to_save") or kept.get("use_dora") or kept.get("bias", "none") != "none":
        raise VerificationError(f"{rule.name}: adapter_config.json asks for something {rule.name} refuses")
    targets = kept["target_modules"]
    if isinstance(targets, str) and rule.string_target_modules is not None and targets not in rule.string_target_modules:
        raise VerificationError(f"{rule.name}: target_modules {targets!r} must be a list or one of {rule.string_target_modules}")
    r, alpha, rslora = int(kept["r"]), float(kept["lora_alpha"]), bool(kept.get("use_rslora", False))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(folder / "adapter_model.safetensors")).items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        suffix = next((s for s in rule.tensor_suffixes if name.endswith("." + s)), None)
        if suffix is None:
            raise VerificationError(f"{rule.name}: tensor {key} is not a LoRA A/B weight; {rule.name} refuses it")
        pairs.setdefault(name[: -len(suffix) - 1], {})[suffix] = value
    modules = []
    for module, parts in sorted(pairs.items()):
        A, B = parts.get(rule.tensor_suffixes[0]), parts.get(rule.tensor_suffixes[1])
        if A is None or B is None:
            raise VerificationError(f"{rule.name}: {module} lacks its lora_A or lora_B")
        modules.append(ModuleFactors(module, A.float(), B.float(), rule.scale(alpha, r, A.shape[0], rslora)))
    return modules


# ---------------------------------------------------------------------------------------------
# Verification: the engine's view of the written files against PEFT base+adapter


VERIFY_PROMPTS = (
    "The capital of France is",
    "Repeat after me: yes",
    'Convert to JSON: lunch with Sam on Friday at 1pm -> {"title": "',
)


def verify(run: AdapterRun, spec, source, modules: list[ModuleFactors] | None, peft_folder: Path | None, rule: EngineRule) -> ExportVerification:
    gap, effect, prompts, tokens = logits_gap(run, spec, source, modules, peft_folder)
    method = ("PEFT loads the written folder" if modules is None
              else f"written files read under {rule.name}'s rule ({rule.scaling}), applied to the fp32 base")
    if not gap <= FP32_TOLERANCE:
        raise VerificationError(
            f"verify: {rule.name}'s reading of the export differs from base+adapter by {gap:.3g} (tolerance {FP32_TOLERANCE:g}); nothing was written"
        )
    return ExportVerification(method=method, prompts=prompts, tokens=tokens, max_abs_diff=gap, tolerance=FP32_TOLERANCE, adapter_effect=effect)


def logits_gap(run: AdapterRun, spec, source, modules: list[ModuleFactors] | None, peft_folder: Path | None = None) -> tuple[float, float, int, int]:
    """(max |engine view - PEFT base+adapter|, max |base - base+adapter|, prompts, tokens), all fp32.

    `modules` is what an engine adds to each layer (scale * B @ A x); with None, PEFT loads `peft_folder`."""
    from peft import PeftModel  # lazy: ~2 s and bitsandbytes' notes on stderr, which export's refusals need not pay


    tokenizer = run.tokenizer()
    prompts = [torch.tensor([ids]) for p in VERIFY_PROMPTS if (ids := tokenizer(p)["input_ids"])]
    base = load_base_model(spec.model_copy(update={"dtype": "float32", "quantization": None}), source, "fp32")
    reference = PeftModel.from_pretrained(base, str(run.path)).eval()
    with torch.no_grad():
        exact = [reference(input_ids=ids).logits for ids in prompts]
        with reference.disable_adapter():
            plain = [reference(input_ids=ids).logits for ids in prompts]
        model = reference.unload()
        if modules is None:
            model = PeftModel.from_pretrained(model, str(peft_folder)).eval()
            got = [model(input_ids=ids).logits for ids in prompts]
        else:
            handles = [_add_lora(model, m) for m in modules]
            try:
                got = [model(input_ids=ids).logits for ids in prompts]
            finally:
                for h in handles:
                    h.remove()
    gap = max(float((g - e).abs().max()) for g, e in zip(got, exact))
    effect = max(float((p - e).abs().max()) for p, e in zip(plain, exact))
    return gap, effect, len(prompts), sum(int(ids.shape[1]) for ids in prompts)


def _add_lora(model, m: ModuleFactors):
    try:
        layer = model.get_submodule(m.module)
    except AttributeError:
        raise VerificationError(f"verify: the base has no module {m.module}; the engine would not find it either") from None
    A, B = m.A.float(), m.B.float()

    def hook(_module, inputs, output):
        return output + m.scale * ((inputs[0] @ A.T) @ B.T)

    return layer.register_forward_hook(hook)


# ---------------------------------------------------------------------------------------------
# --to merged: loraft merge, with an export manifest beside it


def _export_merged(run: AdapterRun, rule: EngineRule, out: Path, spec, source, matches) -> ExportResult:
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = partial_dir(out)
    try:
        result = merge(run.path, scratch / "model")
        logits = result.manifest.verification.logits
        verification = None if logits is None else ExportVerification(
            method="loraft merge: the merged folder loaded with plain transformers", prompts=logits["prompts"],
            tokens=logits["tokens"], max_abs_diff=logits["max_abs_diff"], tolerance=logits["tolerance"],
            adapter_effect=None,
        )
        staged = scratch / "model"
        manifest = ExportManifest(
            loraft_version=__version__, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), target=rule.name,
            rule=_rule_record(rule), run_dir=str(run.path), adapter_sha256=result.manifest.adapter.sha256,
            base_model=spec.name, base_for_target=str(out.resolve()), base_fingerprint_matches=matches,
            lora_alpha=None, use_rslora=None, conversions=["merged into the base weights (W + s*B@A)"],
            files={p.name: file_sha256(p) for p in sorted(staged.iterdir()) if p.is_file()},
            command=f"vllm serve {out.resolve()}", verification=verification,
        )
        atomic_write_json(staged / EXPORT_MANIFEST, manifest.model_dump(mode="json"))
        os.replace(staged, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return ExportResult(out.resolve(), manifest)
