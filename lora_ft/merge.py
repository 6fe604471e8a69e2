"""Merge stage: base weights + a LoRA adapter -> an ordinary model folder that needs no PEFT.

Reads the base's safetensors shards one tensor at a time and writes each merged tensor straight
into its output shard, so resident memory stays near one tensor (plus the adapter), whatever the
model's size. For every adapted weight W' = W + s*B@A in fp32 (s = alpha/r, or alpha/sqrt(r) with
rsLoRA; DoRA rescales each output row to its trained magnitude), then cast to the output dtype.
Each adapted tensor is checked as it is written (W'x against Wx + s*B(Ax) on random x, within the
output dtype's rounding bound); then, when two copies of the model fit in memory, the merged
folder is loaded with plain transformers and its logits compared with base+adapter under PEFT.
Everything is written to a temporary sibling folder, renamed to --out only after the checks pass.
Pitfall guarded: an adapter merged onto the wrong base gives garbage silently, so the base's
fingerprint must match the one recorded at training time (--force overrides, and is recorded).
Shard reading/writing lives in shards.py, the plan and its shard pass in merge_plan.py, the two checks in merge_check.py.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


from rich.console import Console
from transformers import AutoConfig, AutoTokenizer

from lora_ft.artifacts.fingerprint import fingerprint_model_path
from lora_ft.model.coverage import wrappers_for_adapter
from lora_ft.model.loading import load_base_model, load_tokenizer
from lora_ft.model.speed import one_torch_thread
from lora_ft import __version__
from lora_ft.errors import LoraftError
from lora_ft.artifacts.manifests import (
    MergeManifest, MergedAdapterRecord, MergedBaseRecord, ModuleCheckRecord, VerificationRecord, write_manifest,
)
from lora_ft.merge_check import full_check_unfits, verify_logits
from lora_ft.merge_plan import DTYPE_NAMES, MergePlan, Written, plan_merge, qlora_choice, write_merged
from lora_ft.artifacts.adapter import AdapterWeights
from lora_ft.artifacts.adapter_run import AdapterRun
from lora_ft.artifacts.locks import sweep_leftovers
from lora_ft.artifacts.run_dir import atomic_dir, atomic_write_json, require_new_out

PEFT_PREFIX = "base_model.model."


# ---------------------------------------------------------------------------------------------
# Result


@dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    manifest: MergeManifest

    def summary(self) -> str:
        m = self.manifest
        mod = m.verification.per_module
        matches = m.base_model.fingerprint_matches
        lines = [
            f"merged model written to {self.out_dir}",
            f"base            {m.base_model.name} (fingerprint {m.base_model.fingerprint}, "
            f"{'matches the adapter' if matches else 'NOT CHECKED' if matches is None else 'MISMATCH, merged with --force'})",
            f"weights         {m.dtype}, {m.shards} shard(s), {m.bytes_written / 2**30:.2f} GiB "
            f"in {m.merge_seconds:.1f}s ({m.mb_per_s:.0f} MB/s)",
            f"adapted         {mod.tensors} tensors (scaling {_scalings(m.scalings)}); "
            f"{len(m.replaced)} replaced by the adapter's copies"
            + "".join(f"; {len(ids)} trained token rows in {name}" for name, ids in m.token_rows.items())
            + (f"; qlora base: {m.qlora_base}" if m.qlora_base else ""),
            f"per-module      max |W'x - (Wx + sBAx)| = {mod.max_abs_error:.3g} "
            f"({mod.max_error_to_bound:.3f} of the {m.dtype} rounding bound)",
        ]
        full = m.verification.logits
        if full is None:
            lines.append(f"logits check    skipped: {m.verification.logits_skipped}")
        else:
            lines.append(
                f"logits check    max |merged - base+adapter| = {full['max_abs_diff']:.3g} over {full['prompts']} prompts "
                f"({full['tokens']} tokens), tolerance {full['tolerance']:.3g}: ok"
            )
        if m.force:
            lines.append("warning         --force: this base is not the one the adapter was trained on")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"out_dir": str(self.out_dir), "manifest": self.manifest.model_dump(mode="json")}


def _scalings(scalings: list[float]) -> str:
    values = sorted(set(scalings))
    return ", ".join(f"{s:g}" for s in values[:4]) + (" ..." if len(values) > 4 else "")


# ---------------------------------------------------------------------------------------------
# The stage


def merge(
    adapter: str | Path,
    out: str | Path,
    *,
    base: str | None = None,
    dtype: str = "auto",
    force: bool = False,
    qlora_base: str = "original",
    verify: bool = True,
    console=None,
) -> MergeResult:
    console = console or _default_console()
    started = time.time()
    out = require_new_out(out)
    run = AdapterRun.load(adapter)
    spec, source, matches = run.resolve_base(base, force=force)
    sweep_leftovers(out, lambda line: console.print(f"note: {line}", markup=False, highlight=False))
    qlora = qlora_choice(run, qlora_base)
    lora = load_adapter(run, None if source.gguf_file else source.path)

    with one_torch_thread(), atomic_dir(out) as staging, _base_checkpoint(spec, source, out.parent, console) as base_dir:
        plan = plan_merge(base_dir, lora, dtype, qlora)
        written = write_merged(plan, staging, console)
        tokenizer = write_sidecars(plan, base_dir, run, spec, source, staging)
        logits = None
        skipped = "--no-verify"
        if verify:
            skipped = full_check_unfits(plan)
            if skipped is None:
                with console.status("verifying: merged model vs base + adapter (PEFT)"):
                    logits = verify_logits(staging, run, plan, tokenizer, trust_remote_code=spec.trust_remote_code)
        manifest = _manifest(run, spec, source, matches, force, plan, written, logits, skipped, time.time() - started)
        (staging / "README.md").write_text(model_card(manifest), encoding="utf-8")
        write_manifest(staging, manifest)
        _readable_by_all(staging)
    return MergeResult(out.resolve(), manifest)


def _readable_by_all(folder: Path) -> None:
    """Temporary folders and files are created private (0700/0600); a model folder is meant to be read
    by servers running as other users, so give it the permissions the umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o755 & ~umask)
    for item in folder.iterdir():
        item.chmod((0o755 if item.is_dir() else 0o644) & ~umask)


def _default_console():
    return Console(stderr=True, soft_wrap=True)  # a warning stays one line when piped


# ---------------------------------------------------------------------------------------------
# The adapter: read by artifacts/adapter.py; here only what merge cannot fold exactly is refused


def load_adapter(run: AdapterRun, base_dir: Path | None = None) -> AdapterWeights:
    """The run's adapter (artifacts/adapter.py's one reader), refusing what cannot be merged exactly.
    LoRA on expert/router parameters (target_parameters) needs the base's config (`base_dir`) for its layout."""
    weights = run.weights(_parameter_wrappers(run, base_dir))
    for factors in weights.factors.values():
        if factors.magnitude is not None and factors.transpose and not run.adapter.fan_in_fan_out:
            raise LoraftError(f"--adapter: {factors.module} is a DoRA embedding, which loraft cannot merge")
    return weights


def _parameter_wrappers(run: AdapterRun, base_dir: Path | None) -> dict:
    if not run.adapter.target_parameters:
        return {}
    if base_dir is None:
        raise LoraftError(
            "--adapter: LoRA on MoE expert/router parameters (target_parameters) is read with the base model's config; "
            "merge it (loraft merge, or loraft export --to merged)"
        )
    trust = bool(run.config and run.config.model.trust_remote_code)
    return wrappers_for_adapter(AutoConfig.from_pretrained(str(base_dir), trust_remote_code=trust), run.adapter_config, trust)


# ---------------------------------------------------------------------------------------------
# The base checkpoint as safetensors shards


@contextmanager
def _base_checkpoint(spec, source, scratch_parent: Path, console) -> Iterator[Path]:
    """The base as a folder of safetensors shards.

    A .gguf base has no shards: transformers dequantizes it (the same weights training saw), and we
    save that once as safetensors in a temporary folder beside --out, then merge as for any folder.
    This holds the whole dequantized model in memory once, so it suits the small GGUF models
    loraft trains from GGUF (the quickstart's 135M); large bases come as safetensors.
    """
    if source.gguf_file is None:
        yield source.path
        return

    scratch_parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".gguf-dequantized-", dir=scratch_parent))
    try:
        with console.status(f"dequantizing {source.gguf_file} to safetensors"):
            model = load_base_model(spec.model_copy(update={"dtype": "float32", "quantization": None}), source, "fp32")
            model.save_pretrained(str(scratch), safe_serialization=True)
            del model
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Beside the weights: config, generation config, tokenizer


def write_sidecars(plan: MergePlan, base_dir: Path, run: AdapterRun, spec, source, out_dir: Path):
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)  # merged weights are dense; a leftover marker makes loaders quantize
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = DTYPE_NAMES[plan.dtype]
    if plan.untie:
        config["tie_word_embeddings"] = False
    atomic_write_json(out_dir / "config.json", config)
    # The run's generation config stops at the template's end-of-turn token; a base's often does not.
    for folder in (run.path, base_dir):
        if (folder / "generation_config.json").is_file():
            shutil.copy2(folder / "generation_config.json", out_dir / "generation_config.json")
            break
    # The tokenizer exactly as trained (with its chat template) when the adapter folder has it.
    if (run.path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(run.path))
    else:
        tokenizer = load_tokenizer(spec, source)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Manifest and model card


def _manifest(run, spec, source, matches, force, plan: MergePlan, written: Written, logits, skipped, seconds) -> MergeManifest:
    recorded = run.base_fingerprint
    actual = recorded if matches else fingerprint_model_path(source.path, source.gguf_file)
    adapter = plan.adapter.config
    return MergeManifest(
        loraft_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        base_model=MergedBaseRecord(
            name=spec.name,
            resolved_path=source.display,
            fingerprint=actual,
            recorded_fingerprint=recorded,
            fingerprint_matches=matches,
        ),
        force=force,
        adapter=MergedAdapterRecord(
            path=str(run.path),
            sha256=plan.adapter.sha256,
            rank=adapter.rank,
            alpha=adapter.alpha,
            use_rslora=adapter.use_rslora,
            use_dora=adapter.use_dora,
            trained_quantization=run.trained_quantization,
        ),
        qlora_base=plan.qlora_base,
        dtype=DTYPE_NAMES[plan.dtype],
        shards=len(plan.shards),
        bytes_written=written.total_bytes,
        merge_seconds=round(written.seconds, 2),
        mb_per_s=written.total_bytes / 1e6 / max(written.seconds, 1e-9),
        adapted_tensors=sorted(plan.adapted_weights),
        scalings=written.scalings,
        replaced=sorted(plan.adapter.replacements),
        token_rows={name: ids for name, (ids, _) in sorted(plan.adapter.token_rows.items())},
        untied_embeddings=plan.untie,
        verification=VerificationRecord(
            per_module=ModuleCheckRecord(
                tensors=written.checked,
                max_abs_error=written.max_abs_error,
                max_error_to_bound=written.max_error_to_bound,
            ),
            logits=logits,
            logits_skipped=skipped if logits is None else None,
        ),
        serving=run.config.serving if run.config is not None else None,
        wall_seconds=round(seconds, 1),
    )


def model_card(m: MergeManifest) -> str:
    base = m.base_model.name
    logits = m.verification.logits
    check = (
        f"max |logit difference| {logits['max_abs_diff']:.3g} against base+adapter under PEFT "
        f"(tolerance {logits['tolerance']:.3g}, {logits['prompts']} prompts)"
        if logits else f"logits check skipped ({m.verification.logits_skipped})"
    )
    commands = {
        "vllm": "vllm serve <this folder>",
        "sglang": "python -m sglang.launch_server --model-path <this folder>",
    }
    targets = m.serving.targets if m.serving is not None else ()
    serve = next((commands[t] for t in targets if t in commands), None)
    serve_text = f"\nServe it: `{serve}`\n" if serve else ""
    forced = "\n**Merged with --force onto a base other than the adapter's own.**\n" if m.force else ""
    return f"""---
base_model: {base}
tags: [lora, merged, loraft]
---
# {Path(m.adapter.path).name} merged into {base}

An ordinary {m.dtype} model folder: the LoRA adapter (rank {m.adapter.rank}, alpha {m.adapter.alpha:g}
{', rsLoRA' if m.adapter.use_rslora else ''}{', DoRA' if m.adapter.use_dora else ''}) merged into the base weights by loraft {m.loraft_version}; no PEFT needed.
{forced}
- base fingerprint `{m.base_model.fingerprint}`; adapter sha256 `{m.adapter.sha256[:16]}...`
- {m.verification.per_module.tensors} adapted tensors, each checked as written (W'x against Wx + sBAx)
- {check}
{f"- QLoRA adapter merged into the {m.qlora_base} full-precision weights" if m.qlora_base else ''}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("<this folder>")
tokenizer = AutoTokenizer.from_pretrained("<this folder>")
```
{serve_text}"""
