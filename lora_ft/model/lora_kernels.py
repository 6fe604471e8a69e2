"""Triton kernels for LoRA with dropout on CUDA: the dropout mask is never stored, nor is the dropped input.

The mask is a pure function of (Philox key, counter, row, column) drawn from the CUDA generator's stream, so
every kernel that needs it recomputes it in registers: the forward A-product reads the input once; backward's
grad(A) reads it once more; the input gradient's low-rank term is added into the base gradient in one
read-modify-write. The torch ops path in fused_lora.py moves ~27 bytes per input element per projection for
the same work; these move ~8. Used for bf16/fp16 compute with dropout > 0; fused_lora.py falls back to torch
ops elsewhere. tests/test_lora_kernels.py checks them against the explicit formula (Triton's interpreter on
CPU, the real kernels on CUDA).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _keep_tile(key, base, rows, col0, quads_per_row, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Keep-mask of rows x [col0, col0 + BLOCK_K): one Philox call per 4 columns, column c taking word c % 4."""
    quads = col0 // 4 + tl.arange(0, BLOCK_K // 4)
    counter = base + rows[:, None] * quads_per_row + quads[None, :]
    r0, r1, r2, r3 = tl.randint4x(key, counter)
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_K))
    return tl.uint_to_uniform_float(words) >= p


@triton.jit
def _lora_a_kernel(x_ptr, a_ptr, out_ptr, M, K, RANK, k_per_split, key, base, p, scale,
                   R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[split, m, :] = sum over this split's columns of dropout(x)[m, k] * A[:, k] (fp32 partials)."""
    pid_m, split = tl.program_id(0), tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ranks = tl.arange(0, R)
    acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    k_start = split * k_per_split
    for step in range(0, k_per_split, BLOCK_K):
        col0 = k_start + step
        cols = col0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        keep = _keep_tile(key, base, rows, col0, K // 4, p, BLOCK_M, BLOCK_K)
        dropped = tl.where(keep, x * scale, 0.0).to(x.dtype)
        a_t = tl.load(a_ptr + ranks[None, :] * K + cols[:, None], mask=col_ok[:, None] & (ranks[None, :] < RANK), other=0.0)
        acc += tl.dot(dropped, a_t)
    out = out_ptr + split * M * R + rows[:, None] * R + ranks[None, :]
    tl.store(out, acc, mask=row_ok[:, None])


@triton.jit
def _lora_grad_input_kernel(gx_ptr, gh_ptr, a_ptr, M, K, RANK, key, base, p, scale,
                            ACCUMULATE: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """gx[m, k] (+)= keep[m, k] * scale * sum_j gh[m, j] * A[j, k]."""
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    col0 = pid_k * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    ranks = tl.arange(0, R)
    gh = tl.load(gh_ptr + rows[:, None] * RANK + ranks[None, :], mask=row_ok[:, None] & (ranks[None, :] < RANK), other=0.0)
    a = tl.load(a_ptr + ranks[:, None] * K + cols[None, :], mask=(ranks[:, None] < RANK) & col_ok[None, :], other=0.0)
    low_rank = tl.dot(gh, a)
    keep = _keep_tile(key, base, rows, col0, K // 4, p, BLOCK_M, BLOCK_K)
    term = tl.where(keep, low_rank * scale, 0.0)
    where = gx_ptr + rows[:, None] * K + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    if ACCUMULATE:
        term += tl.load(where, mask=ok, other=0.0).to(tl.float32)
    tl.store(where, term.to(gx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _lora_grad_a_kernel(gh_ptr, x_ptr, out_ptr, M, K, RANK, rows_per_split, key, base, p, scale,
                        R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[split, :, k] = sum over this split's rows of gh[m, :] * dropout(x)[m, k] (fp32 partials)."""
    split, pid_k = tl.program_id(0), tl.program_id(1)
    col0 = pid_k * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    ranks = tl.arange(0, R)
    acc = tl.zeros((R, BLOCK_K), dtype=tl.float32)
    m_start = split.to(tl.int64) * rows_per_split
    for m0 in range(0, rows_per_split, BLOCK_M):
        rows = m_start + m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        keep = _keep_tile(key, base, rows, col0, K // 4, p, BLOCK_M, BLOCK_K)
        dropped = tl.where(keep, x * scale, 0.0).to(x.dtype)
        gh_t = tl.load(gh_ptr + rows[None, :] * RANK + ranks[:, None], mask=row_ok[None, :] & (ranks[:, None] < RANK), other=0.0)
        acc += tl.dot(gh_t, dropped)
    out = out_ptr + split * R * K + ranks[:, None] * K + cols[None, :]
    tl.store(out, acc, mask=col_ok[None, :])


BLOCK_M, BLOCK_K = 64, 64


def _padded_rank(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def supported(x: torch.Tensor, p: float) -> bool:
    """Shapes and dtypes these kernels take: a 16-bit compute dtype, dropout on, columns in whole Philox words."""
    return p > 0.0 and x.dtype in (torch.bfloat16, torch.float16) and x.shape[-1] % BLOCK_K == 0


class DropoutStream:
    """The Philox key and counter base of one dropout draw, reserved from the device's default generator, so the
    draw is seeded by torch.manual_seed, restored by checkpoint recomputation, and never reused."""

    def __init__(self, x2: torch.Tensor):
        generator = torch.cuda.default_generators[x2.device.index] if x2.is_cuda else torch.default_generator
        self.key = generator.initial_seed() % 2**63
        self.base = generator.get_offset() if x2.is_cuda else 0
        words = x2.shape[0] * x2.shape[1] // 4
        if x2.is_cuda:
            generator.set_offset(self.base + (words + 3) // 4 * 4)  # Philox offsets advance in fours
        else:  # Triton's CPU interpreter (tests): take a fresh key from the CPU stream instead
            self.key = int(torch.randint(0, 2**62, (1,), generator=generator))


def lora_a(x2: torch.Tensor, a: torch.Tensor, stream: DropoutStream, p: float) -> torch.Tensor:
    """dropout(x2) @ a.T, (M, r) in x2's dtype; x2 (M, K) and a (r, K) contiguous."""
    m, k = x2.shape
    rank = a.shape[0]
    r_pad = _padded_rank(rank)
    # Split the columns until the grid has a few programs per multiprocessor: one program per row block (128 at
    # 8k tokens) left most of an H200 idle (lora_a then ran at ~0.6 TB/s). Partials are summed below.
    row_blocks = triton.cdiv(m, BLOCK_M)
    splits = max(1, min(triton.cdiv(k, BLOCK_K), triton.cdiv(4 * _multiprocessors(x2.device), row_blocks)))
    k_per_split = triton.cdiv(triton.cdiv(k, splits), BLOCK_K) * BLOCK_K
    splits = triton.cdiv(k, k_per_split)
    partial = torch.empty(splits, m, r_pad, device=x2.device, dtype=torch.float32)
    grid = (triton.cdiv(m, BLOCK_M), splits)
    _lora_a_kernel[grid](x2, a, partial, m, k, rank, k_per_split, stream.key, stream.base, p, 1.0 / (1.0 - p),
                         R=r_pad, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
    return partial.sum(0)[:, :rank].to(x2.dtype)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def lora_grad_input(grad_x: torch.Tensor | None, grad_hidden: torch.Tensor, a: torch.Tensor, stream: DropoutStream,
                    p: float, shape) -> torch.Tensor:
    """grad_x + dropout'(grad_hidden @ a) in place (or a new tensor when grad_x is None)."""
    m, rank = grad_hidden.shape
    k = a.shape[1]
    out = grad_x if grad_x is not None else torch.empty(shape, device=grad_hidden.device, dtype=grad_hidden.dtype)
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(k, BLOCK_K))
    _lora_grad_input_kernel[grid](out, grad_hidden.contiguous(), a, m, k, rank, stream.key, stream.base, p, 1.0 / (1.0 - p),
                                  ACCUMULATE=grad_x is not None, R=_padded_rank(rank), BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
    return out


def lora_grad_a(grad_hidden: torch.Tensor, x2: torch.Tensor, stream: DropoutStream, p: float) -> torch.Tensor:
    """grad_hidden.T @ dropout(x2): (r, K) fp32."""
    m, k = x2.shape
    rank = grad_hidden.shape[1]
    r_pad = _padded_rank(rank)
    rows_per_split = max(BLOCK_M, 1024)
    splits = triton.cdiv(m, rows_per_split)
    partial = torch.empty(splits, r_pad, k, device=x2.device, dtype=torch.float32)
    grid = (splits, triton.cdiv(k, BLOCK_K))
    _lora_grad_a_kernel[grid](grad_hidden.contiguous(), x2, partial, m, k, rank, rows_per_split, stream.key, stream.base, p,
                              1.0 / (1.0 - p), R=r_pad, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
    return partial.sum(0)[:rank]

