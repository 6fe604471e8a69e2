"""Triton kernels for LoRA with dropout on CUDA: the dropped input is never stored, and the mask only as bits.

The forward A-product reads the input once and draws the mask there (a pure function of Philox key, counter,
row and column from the CUDA generator's stream: one Philox call per 8 elements, a 16-bit uniform each), then
writes it as one bit per element (1/16 of the bf16 input it guards). Backward reads those bits instead of
drawing again: grad(A) reads the input once more; the input gradient's low-rank term is added into the base
gradient in one read-modify-write. Drawing, not memory traffic, was what these kernels spent their time on
(inferred: on an H200 they ran at ~4x their bytes' time, and Philox is ~30 integer operations per element; three
draws per element were ~60 ms of a 0.54 s Llama-8B step, scripts/results/h200_run3_profile_lora-auto.txt); one
draw at half the calls is a sixth of that. Used for bf16/fp16 compute with dropout > 0; fused_lora.py falls
back to torch ops elsewhere. P(drop) is p rounded to a multiple of 2^-16 (0.05 -> 0.0500031). tests/test_lora_kernels.py checks them against the explicit formula (Triton's interpreter on
CPU, the real kernels on CUDA).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _keep_tile(key, base, rows, col0, calls_per_row, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Keep-mask of rows x [col0, col0 + BLOCK_K): one Philox call per 8 columns, each column a 16-bit uniform
    (the call's words in order, low half first), kept where it is >= threshold = round(p * 65536)."""
    calls = col0 // 8 + tl.arange(0, BLOCK_K // 8)
    counter = base + rows[:, None] * calls_per_row + calls[None, :]
    r0, r1, r2, r3 = tl.randint4x(key, counter)
    words = tl.join(tl.join(r0, r2), tl.join(r1, r3))  # [.., i, k] = word 2i + k
    halves = tl.join(words & 0xFFFF, words >> 16)  # [.., i, k, h] = half h of word 2i + k
    return tl.reshape(halves, (BLOCK_M, BLOCK_K)).to(tl.int32) >= threshold


@triton.jit
def _pack_bits(keep, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_K) bools -> (BLOCK_M, BLOCK_K // 8) bytes, column 8q + j in bit j of byte q."""
    bits = tl.reshape(keep.to(tl.int32), (BLOCK_M, BLOCK_K // 8, 8))
    return tl.sum(bits << tl.arange(0, 8)[None, None, :], axis=2).to(tl.uint8)


@triton.jit
def _unpack_bits(packed, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    bits = (packed.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.reshape(bits, (BLOCK_M, BLOCK_K)) != 0


@triton.jit
def _lora_a_kernel(x_ptr, a_ptr, out_ptr, bits_ptr, M, K, RANK, k_per_split, key, base, threshold, scale,
                   R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[split, m, :] = sum over this split's columns of dropout(x)[m, k] * A[:, k] (fp32 partials); the mask
    is drawn here, once, and written as bits for backward."""
    pid_m, split = tl.program_id(0), tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ranks = tl.arange(0, R)
    acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    k_start = split * k_per_split
    for step in tl.range(0, k_per_split, BLOCK_K):
        col0 = k_start + step
        cols = col0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        keep = _keep_tile(key, base, rows, col0, K // 8, threshold, BLOCK_M, BLOCK_K)
        byte_cols = col0 // 8 + tl.arange(0, BLOCK_K // 8)
        tl.store(bits_ptr + rows[:, None] * (K // 8) + byte_cols[None, :], _pack_bits(keep, BLOCK_M, BLOCK_K),
                 mask=row_ok[:, None] & (byte_cols[None, :] < K // 8))
        dropped = tl.where(keep, x * scale, 0.0).to(x.dtype)
        a_t = tl.load(a_ptr + ranks[None, :] * K + cols[:, None], mask=col_ok[:, None] & (ranks[None, :] < RANK), other=0.0)
        acc += tl.dot(dropped, a_t)
    out = out_ptr + split * M * R + rows[:, None] * R + ranks[None, :]
    tl.store(out, acc, mask=row_ok[:, None])


@triton.jit
def _keep_of(bits_ptr, rows, row_ok, col0, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The keep-mask of rows x [col0, col0 + BLOCK_K) read back from the bits _lora_a_kernel wrote."""
    byte_cols = col0 // 8 + tl.arange(0, BLOCK_K // 8)
    packed = tl.load(bits_ptr + rows[:, None] * (K // 8) + byte_cols[None, :],
                     mask=row_ok[:, None] & (byte_cols[None, :] < K // 8), other=0)
    return _unpack_bits(packed, BLOCK_M, BLOCK_K)


@triton.jit
def _lora_grad_input_kernel(gx_ptr, gh_ptr, a_ptr, bits_ptr, M, K, RANK, scale,
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
    keep = _keep_of(bits_ptr, rows, row_ok, col0, K, BLOCK_M, BLOCK_K)
    term = tl.where(keep, low_rank * scale, 0.0)
    where = gx_ptr + rows[:, None] * K + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    if ACCUMULATE:
        term += tl.load(where, mask=ok, other=0.0).to(tl.float32)
    tl.store(where, term.to(gx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _lora_grad_a_kernel(gh_ptr, x_ptr, out_ptr, bits_ptr, M, K, RANK, rows_per_split, scale,
                        R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[split, :, k] = sum over this split's rows of gh[m, :] * dropout(x)[m, k] (fp32 partials)."""
    split, pid_k = tl.program_id(0), tl.program_id(1)
    col0 = pid_k * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    ranks = tl.arange(0, R)
    acc = tl.zeros((R, BLOCK_K), dtype=tl.float32)
    m_start = split.to(tl.int64) * rows_per_split
    for m0 in tl.range(0, rows_per_split, BLOCK_M):
        rows = m_start + m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        keep = _keep_of(bits_ptr, rows, row_ok, col0, K, BLOCK_M, BLOCK_K)
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
        calls = x2.shape[0] * x2.shape[1] // 8  # one Philox call (four 32-bit words) per 8 elements
        if x2.is_cuda:
            generator.set_offset(self.base + (calls + 3) // 4 * 4)  # Philox offsets advance in fours
        else:  # Triton's CPU interpreter (tests): take a fresh key from the CPU stream instead
            self.key = int(torch.randint(0, 2**62, (1,), generator=generator))


def threshold(p: float) -> int:
    """Drop where the element's 16-bit uniform is below this: P(drop) = round(p * 65536) / 65536, within 2^-17 of p."""
    return round(p * 65536)


def lora_a(x2: torch.Tensor, a: torch.Tensor, stream: DropoutStream, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dropout(x2) @ a.T as (M, r) in x2's dtype, the keep-mask as bits: (M, K / 8) uint8, column 8q + j in bit j
    of byte q). x2 (M, K) and a (r, K) contiguous. The mask is drawn here only; backward reads the bits."""
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
    bits = torch.empty(m, k // 8, device=x2.device, dtype=torch.uint8)
    grid = (triton.cdiv(m, BLOCK_M), splits)
    _lora_a_kernel[grid](x2, a, partial, bits, m, k, rank, k_per_split, stream.key, stream.base, threshold(p),
                         1.0 / (1.0 - p), R=r_pad, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
    return partial.sum(0)[:, :rank].to(x2.dtype), bits


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def lora_grad_input(grad_x: torch.Tensor | None, grad_hidden: torch.Tensor, a: torch.Tensor, bits: torch.Tensor,
                    p: float, shape) -> torch.Tensor:
    """grad_x + dropout'(grad_hidden @ a) in place (or a new tensor when grad_x is None), the mask from `bits`."""
    m, rank = grad_hidden.shape
    k = a.shape[1]
    out = grad_x if grad_x is not None else torch.empty(shape, device=grad_hidden.device, dtype=grad_hidden.dtype)
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(k, BLOCK_K))
    _lora_grad_input_kernel[grid](out, grad_hidden.contiguous(), a, bits, m, k, rank, 1.0 / (1.0 - p),
                                  ACCUMULATE=grad_x is not None, R=_padded_rank(rank), BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
    return out


def lora_grad_a(grad_hidden: torch.Tensor, x2: torch.Tensor, bits: torch.Tensor, p: float) -> torch.Tensor:
    """grad_hidden.T @ dropout(x2): (r, K) fp32, the mask from `bits`."""
    m, k = x2.shape
    rank = grad_hidden.shape[1]
    r_pad = _padded_rank(rank)
    rows_per_split = max(BLOCK_M, 1024)
    splits = triton.cdiv(m, rows_per_split)
    partial = torch.empty(splits, r_pad, k, device=x2.device, dtype=torch.float32)
    grid = (splits, triton.cdiv(k, BLOCK_K))
    _lora_grad_a_kernel[grid](grad_hidden.contiguous(), x2, partial, bits, m, k, rank, rows_per_split, 1.0 / (1.0 - p),
                              R=r_pad, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
    return partial.sum(0)[:rank]
