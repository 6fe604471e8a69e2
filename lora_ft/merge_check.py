"""Merge's self-checks: every adapted tensor as it is written, then the whole model's logits.

`check_module` compares W'x with Wx + s*B(Ax) on random x for one tensor, within the output dtype's
rounding bound; it needs one tensor's memory, so it runs for every adapted tensor of any model.
`verify_logits` loads the merged folder with plain transformers and base+adapter under PEFT and
compares logits on fixed prompts; it needs both models in fp32, so `full_check_unfits` says when
to rely on the per-module check alone.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from lora_ft.errors import LoraftError, VerificationError

from lora_ft.artifacts.adapter_run import AdapterRun

# MergePlan and TensorJob (annotations only) are merge.py's; importing them here would make a cycle.

FP32_TOLERANCE = 1e-4
# Half-precision output is checked in fp32 arithmetic (weights upcast exactly), so only the rounding of
# W' to 8 (bf16) or 11 (fp16) significant bits separates it from the exact reference. How far that
# rounding can move the logits depends on the network, so the tolerance is measured on the spot: the
# reference is run again with every weight moved by half an ulp of the output dtype in a random
# direction (the largest rounding error, random signs), and the merged model may differ from the exact
# logits by at most HALF_FACTOR times that. Measured, bf16 output: quickstart (SmolLM2-135M, logits up
# to 39): merged 0.21 from exact, probe 0.61, tolerance 1.22, while the adapter itself moves the logits
# by 27; tiny test Llama: merged 0.09, probe 0.23. A wrong scaling, transpose or missing module moves
# logits by a fraction of the adapter's effect, far beyond the tolerance. (bf16 *arithmetic* would add
# ~2 of kernel noise on CPU that says nothing about the merge, hence fp32 arithmetic.)
HALF_FACTOR = 2.0
VERIFY_PROMPTS = (
    "The capital of France is",
    "Repeat after me: yes",
    'Convert to JSON: lunch with Sam on Friday at 1pm -> {"title": "',
)


def check_module(job: TensorJob, base: torch.Tensor, out: torch.Tensor, factor: torch.Tensor | None) -> tuple[float, float]:
    """W'x against Wx + s*B(Ax) on 4 random x, never forming B@A: independent of how W' was computed.

    The bound per output is eps(dtype) * (|W'||x|) for the cast (twice the round-to-nearest
    error) plus 1e-5 * (|W||x| + s|B|(|A||x|)) for fp32 accumulation. Exceeding it means a wrong
    delta (scaling, transpose, mapping), not rounding.
    """
    d = job.delta
    gen = torch.Generator().manual_seed(0)
    # Work in the (out, in) orientation: y = M @ x with x over the input dimension.
    M, Wf = (out.T, base.T) if d.transpose else (out, base)
    x = torch.randn(M.shape[1], 4, generator=gen)
    A, B = d.A.float(), d.B.float()  # M = W + s*B@A in this orientation, transposed or not
    lora = d.scale * (B @ (A @ x))
    ref = Wf @ x + lora
    scale = Wf.abs() @ x.abs() + d.scale * (B.abs() @ (A.abs() @ x.abs()))
    if factor is not None:
        ref = factor.view(-1, 1) * ref
        scale = factor.abs().view(-1, 1) * scale
    Mf = M.float()
    got = Mf @ x
    eps = torch.finfo(job.dtype).eps
    bound = eps * (Mf.abs() @ x.abs()) + 1e-5 * scale + 1e-30
    err = (got - ref).abs()
    if not torch.isfinite(got).all():
        raise VerificationError(f"merge: {job.name} has non-finite values after the merge (overflow in {job.dtype}?)")
    ratio = float((err / bound).max())
    if ratio > 1.0:
        raise VerificationError(
            f"merge: {job.name}: W'x differs from Wx + sBAx by {float(err.max()):.3g}, {ratio:.1f}x the rounding bound; "
            "the merged weight is wrong"
        )
    return float(err.max()), ratio


def full_check_unfits(plan: MergePlan) -> str | None:
    """The logits check holds base+adapter and the merged model, both in fp32; skip it where that
    would not fit in memory (the per-module check has already covered every adapted tensor)."""
    need = plan.n_params * 8 * 1.3
    available = _available_memory()
    if available is not None and need > 0.8 * available:
        return (
            f"base+adapter and the merged model need ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available; "
            "the per-module check covered every adapted tensor"
        )
    return None


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def verify_logits(out_dir: Path, run: AdapterRun, plan: MergePlan, tokenizer, *, trust_remote_code: bool = False) -> dict:
    """Logits of the merged folder (plain transformers, no PEFT) against base+adapter under PEFT.

    Both run in fp32 arithmetic. The reference is exact: base + adapter (with the QLoRA round trip
    when that is what was merged into). fp32 output must match within 1e-4; half-precision output
    within HALF_FACTOR times the measured effect of rounding (see HALF_FACTOR).
    """
    from peft import PeftModel  # lazy: peft ~3 s + bitsandbytes notes on stderr; merge's refusals and --no-verify need none

    prompts = [torch.tensor([ids], dtype=torch.long) for p in VERIFY_PROMPTS if (ids := tokenizer(p)["input_ids"])]
    if not prompts:
        raise LoraftError("verify: the tokenizer turns the check prompts into no tokens; fix the tokenizer or pass --no-verify")
    # The base as merged from: its folder, or for a .gguf base transformers' own dequantized copy of it
    # (loading the GGUF a second time would give the same tensors at twice the cost).
    base = AutoModelForCausalLM.from_pretrained(
        str(plan.base_dir), dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    if plan.qlora_base == "dequantized":
        _apply_roundtrip(base, plan)
    reference = PeftModel.from_pretrained(base, str(run.path)).eval()
    with torch.no_grad():
        exact = [reference(input_ids=ids).logits.float() for ids in prompts]
        rounding = None
        if plan.dtype != torch.float32:
            _perturb_by_half_ulp(reference, plan.dtype)
            rounding = max(float((reference(input_ids=ids).logits - e).abs().max()) for ids, e in zip(prompts, exact))
        del reference, base
        merged = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()
        got = [merged(input_ids=ids).logits for ids in prompts]
    diff = max(float((g - e).abs().max()) for g, e in zip(got, exact))
    scale = max(float(e.abs().max()) for e in exact)
    tolerance = FP32_TOLERANCE if rounding is None else HALF_FACTOR * rounding
    figures = {
        "prompts": len(prompts),
        "tokens": sum(int(ids.shape[1]) for ids in prompts),
        "max_abs_diff": diff,
        "tolerance": tolerance,
        "logit_scale": scale,
        "relative_diff": diff / max(scale, 1e-30),
        "rounding_probe": rounding,
        "reference": "base+adapter (PEFT), fp32" + (", 4-bit round trip of the base" if plan.qlora_base == "dequantized" else ""),
        "arithmetic": "fp32 (merged weights upcast exactly)",
    }
    if not diff <= tolerance:
        raise VerificationError(
            f"verify: merged logits differ from base+adapter by {diff:.3g} (tolerance {tolerance:.3g}); nothing was written"
        )
    return figures


def _perturb_by_half_ulp(model, dtype: torch.dtype) -> None:
    """Move every weight by half an ulp of `dtype` (relative), with a fixed random sign per element."""
    gen = torch.Generator().manual_seed(0)
    half_ulp = torch.finfo(dtype).eps / 2
    for param in model.parameters():
        sign = (torch.rand(param.shape, generator=gen) < 0.5).float().mul_(2).sub_(1)
        param.mul_(sign.mul_(half_ulp).add_(1))


def _apply_roundtrip(model, plan: MergePlan) -> None:
    quantized = {j.name: j.roundtrip for _, jobs in plan.shards for j in jobs if j.roundtrip is not None}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in quantized:
                param.copy_(quantized[name](param.float()))
