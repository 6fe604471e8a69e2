"""Fused LoRA projections: one autograd node per adapted linear layer instead of PEFT's chain of eight.

PEFT computes `base(x) + lora_B(lora_A(dropout(x.float()))) * scaling` op by op. Under bf16 autocast the input
is copied to fp32, dropped out in fp32, cast back to bf16 for the matmul, and the rank-r result is scaled and
added in two more passes; backward walks the chain in reverse. Each pass reads or writes a tensor the size of
the layer's input or output, and at rank 16 those passes, not the matmuls, are what LoRA costs. Here the
dropout runs once in the compute dtype and keeps nothing (backward redraws the same mask from the saved RNG
state), the low-rank product is added by the GEMM itself (addmm), and the input gradient's low-rank term is
accumulated in one pass.

On CUDA with dropout, `lora_kernels.py` goes further: Triton kernels recompute the mask from the Philox
stream wherever it is needed, so neither the mask nor the dropped input is ever written to memory.

Same math: matmuls in the compute dtype with the fp32 LoRA weights cast to it, as autocast does; independent
dropout masks per projection; the gradients land on PEFT's own parameters, so saving, merging and inspecting
are untouched. `tests/test_fused_lora.py` (and `test_lora_kernels.py` for the Triton path) check outputs and
gradients against PEFT's layer, with and without dropout; anything PEFT does that this does not (DoRA, several
active adapters, LoRA bias, other base layer types) runs through PEFT's own forward.
"""

from __future__ import annotations

import functools
import os
import types

import torch
from torch import nn


def _drop(x: torch.Tensor, p: float):
    """Dropout that stores no mask: returns the dropped input and the RNG state that drew it (None when p = 0).
    Backward redraws the same mask from that state instead of keeping one byte per input element alive (on an
    8B model at 8k tokens a step, ~10 GiB of masks)."""
    if p == 0.0:
        return x, None
    state = _rng_state(x.device)
    return torch.native_dropout(x, p, True)[0], state


def _redraw(x: torch.Tensor, p: float, state):
    """The dropped input and mask `_drop` drew from `state`, leaving the global RNG where it was."""
    if state is None:
        return x, None
    devices = [x.device.index] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        _set_rng_state(x.device, state)
        return torch.native_dropout(x, p, True)


def _rng_state(device: torch.device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


@functools.cache
def _kernels():
    try:
        from lora_ft.model import lora_kernels  # lazy: it imports triton, an optional package (none on CPU-only installs)
    except ImportError:  # no Triton (CPU-only installs)
        return None
    return lora_kernels


def triton_available() -> bool:
    return _kernels() is not None


def _use_kernels(allowed: bool, x2: torch.Tensor, p: float) -> bool:
    """Triton kernels on CUDA (or under Triton's CPU interpreter, for tests) where they apply; torch ops elsewhere."""
    if not allowed or p == 0.0 or not (x2.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    kernels = _kernels()
    return kernels is not None and kernels.supported(x2, p)


def _low_rank_forward(ctx, x2: torch.Tensor, a: torch.Tensor, p: float, triton: bool):
    """(x2 possibly made contiguous, hidden = dropout(x2) @ a.T, the Triton path's keep-mask bits or None);
    records in ctx how to redo the dropout on the torch path."""
    ctx.rng_state = None
    if _use_kernels(triton, x2, p):
        x2 = x2.contiguous()
        hidden, bits = _kernels().lora_a(x2, a, _kernels().DropoutStream(x2), p)
        return x2, hidden, bits
    dropped, ctx.rng_state = _drop(x2, p)
    return x2, dropped @ a.t(), None


def _low_rank_backward(ctx, g, x2, hidden, a, b, bits, grad_x, want_x: bool):
    """Gradients of y = base + scaling * dropout(x2) A^T B^T: (grad A, grad B, grad_x plus the low-rank term;
    the term alone when grad_x is None)."""
    p = ctx.p
    grad_hidden = (g @ b).mul_(ctx.scaling)
    grad_b = (g.t() @ hidden).mul_(ctx.scaling)
    if bits is not None:
        kernels = _kernels()
        grad_a = kernels.lora_grad_a(grad_hidden, x2, bits, p)
        if want_x:
            grad_x = kernels.lora_grad_input(grad_x, grad_hidden, a, bits, p, x2.shape)
        return grad_a, grad_b, grad_x
    dropped, mask = _redraw(x2, p, ctx.rng_state)
    grad_a = grad_hidden.t() @ dropped
    del dropped
    if want_x:
        if mask is None:
            grad_x = grad_hidden @ a if grad_x is None else grad_x.addmm_(grad_hidden, a)
        else:
            # Two vectorised kernels beat one addcmul_ with a bool operand (mixed dtypes take torch's slow
            # unrolled path: 150 vs 128 us at 8192x4096 on an H100).
            term = torch.ops.aten.native_dropout_backward(grad_hidden @ a, mask, 1.0 / (1.0 - p))
            grad_x = term if grad_x is None else grad_x.add_(term)
    return grad_a, grad_b, grad_x


class _FusedLoraLinear(torch.autograd.Function):
    """y = x W^T + b + scaling * dropout(x) A^T B^T with the base weight frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, p, dtype, triton):
        ctx.scaling, ctx.p, ctx.in_shape, ctx.in_dtype = scaling, p, x.shape, x.dtype
        ctx.param_dtypes = (lora_a.dtype, lora_b.dtype)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            weight_c, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
            x2, hidden, bits = _low_rank_forward(ctx, x2, a, p, triton)
            if bias is None and x2.is_cuda:
                # The low-rank product first, then the base GEMM accumulates onto it (beta = scaling): cuBLAS's
                # epilogue reads the term in fp32 while the matmul runs, instead of a separate read-modify-write
                # pass over y. (On CPU a bf16 addmm rounds the product before adding: the plain order there.)
                out = torch.mm(hidden, b.t()).addmm_(x2, weight_c.t(), beta=scaling)
            else:
                bias_c = None if bias is None else bias.to(dtype)
                out = torch.nn.functional.linear(x2, weight_c, bias_c).addmm_(hidden, b.t(), alpha=scaling)
        ctx.save_for_backward(x2, hidden, weight_c, a, b, bits)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x2, hidden, weight_c, a, b, bits = ctx.saved_tensors
        want_x = ctx.needs_input_grad[0]
        with torch.autocast(grad_y.device.type, enabled=False):
            g = grad_y.reshape(-1, grad_y.shape[-1]).to(a.dtype)
            grad_x = g @ weight_c if want_x else None
            grad_a, grad_b, grad_x = _low_rank_backward(ctx, g, x2, hidden, a, b, bits, grad_x, want_x)
            if grad_x is not None:
                grad_x = grad_x.view(ctx.in_shape).to(ctx.in_dtype)
        return grad_x, None, None, grad_a.to(ctx.param_dtypes[0]), grad_b.to(ctx.param_dtypes[1]), None, None, None, None


class _FusedLoraDelta(torch.autograd.Function):
    """y = base_out + scaling * dropout(x) A^T B^T, for base layers with their own kernels (4-bit). The term is
    added into base_out in place where its dtype and layout allow (base_out is this node's own fresh input; it comes
    first, as autograd's in-place handling of views expects of the tensor a function modifies)."""

    @staticmethod
    def forward(ctx, base_out, x, lora_a, lora_b, scaling, p, dtype, triton):
        ctx.scaling, ctx.p, ctx.in_shape, ctx.in_dtype = scaling, p, x.shape, x.dtype
        ctx.base_dtype, ctx.param_dtypes = base_out.dtype, (lora_a.dtype, lora_b.dtype)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            x2, hidden, bits = _low_rank_forward(ctx, x2, a, p, triton)
            ctx.save_for_backward(x2, hidden, a, b, bits)
            if base_out.dtype == dtype and base_out.is_contiguous():
                base_out.view(-1, base_out.shape[-1]).addmm_(hidden, b.t(), alpha=scaling)
                ctx.mark_dirty(base_out)
                return base_out
            base2 = base_out.reshape(-1, base_out.shape[-1]).to(dtype)
            out = torch.addmm(base2, hidden, b.t(), alpha=scaling)
        return out.view(*base_out.shape)

    @staticmethod
    def backward(ctx, grad_y):
        x2, hidden, a, b, bits = ctx.saved_tensors
        want_x = ctx.needs_input_grad[1]
        with torch.autocast(grad_y.device.type, enabled=False):
            g = grad_y.reshape(-1, grad_y.shape[-1]).to(a.dtype)
            grad_a, grad_b, grad_x = _low_rank_backward(ctx, g, x2, hidden, a, b, bits, None, want_x)
            if grad_x is not None:
                grad_x = grad_x.view(ctx.in_shape).to(ctx.in_dtype)
        grad_base = grad_y.to(ctx.base_dtype) if ctx.needs_input_grad[0] else None
        return grad_base, grad_x, grad_a.to(ctx.param_dtypes[0]), grad_b.to(ctx.param_dtypes[1]), None, None, None, None


def _fusable_adapter(layer, x: torch.Tensor, args, kwargs):
    """The one active plain-LoRA adapter and its compute dtype, or None where PEFT's own forward must run."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}):
        return None
    name = active[0]
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    if lora_a.bias is not None or lora_b.bias is not None:
        return None
    dropout = layer.lora_dropout[name]
    if not isinstance(dropout, (nn.Dropout, nn.Identity)):
        return None
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    elif x.dtype == lora_a.weight.dtype == lora_b.weight.dtype:
        dtype = x.dtype
    else:
        return None  # mixed dtypes without autocast: PEFT's casts define the math
    p = float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    return name, dtype, p


def _fused_forward(layer, x: torch.Tensor, *args, **kwargs):
    chosen = _fusable_adapter(layer, x, args, kwargs)
    if chosen is None:
        return layer._loraft_peft_forward(x, *args, **kwargs)
    name, dtype, p = chosen
    base = layer.get_base_layer()
    lora_a, lora_b, scaling = layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name])
    if layer._loraft_fused_kind == "linear" and not base.weight.requires_grad:
        return _FusedLoraLinear.apply(x, base.weight, base.bias, lora_a, lora_b, scaling, p, dtype, layer._loraft_triton)
    if layer._loraft_fused_kind == "delta":
        return _FusedLoraDelta.apply(base(x), x, lora_a, lora_b, scaling, p, dtype, layer._loraft_triton)
    return layer._loraft_peft_forward(x, *args, **kwargs)


def _base_kind(base: nn.Module) -> str | None:
    if type(base) is nn.Linear:
        return "linear"
    if type(base).__name__ == "Linear4bit":  # bitsandbytes: its own dequantizing kernel, then our LoRA term
        return "delta"
    return None


def fuse_lora_layers(model: nn.Module, *, triton: bool = True) -> int:
    """Route every plain LoRA projection of `model` through the fused path; returns how many were fused.
    `triton`: use the Triton dropout kernels where they apply (CUDA, 16-bit, dropout on); else torch ops."""
    from peft.tuners.lora import LoraLayer  # lazy: peft ~3 s + bitsandbytes notes on stderr; merge/export/generate import this module, never wrap

    fused = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or hasattr(module, "_loraft_peft_forward"):
            continue
        kind = _base_kind(module.get_base_layer())
        if kind is None:
            continue
        module._loraft_fused_kind, module._loraft_triton = kind, triton
        module._loraft_peft_forward = module.forward
        module.forward = types.MethodType(_fused_forward, module)
        fused += 1
    return fused
