"""The spectrum of a LoRA update without forming it, and how two updates' column spaces overlap.

ΔW = s·B·A is never built: thin QRs of B and Aᵀ and an SVD of the r×r core give its singular values and
directions in O((out + in)·r) memory per module. Read by inspect (rank_diagnostics) and recorded by train.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Mapping

import torch

from lora_ft.artifacts.adapter import ModuleFactors
from lora_ft.errors import LoraftError
from lora_ft.model.speed import one_torch_thread

DEFAULT_ENERGY = 0.9


@dataclass(frozen=True)
class Spectrum:
    """ΔW = left · diag(values) · rightᵀ, from the factors."""

    values: torch.Tensor  # (k,) float64, descending
    left: torch.Tensor  # (out, k) orthonormal columns: the update's column space
    right: torch.Tensor  # (in, k)

    @property
    def norm(self) -> float:
        return float(self.values.square().sum().sqrt())




def spectra_of(factors: Mapping[str, ModuleFactors]) -> dict[str, Spectrum]:
    with one_torch_thread():
        return {m: spectrum_from_factors(f.B, f.A, f.scale) for m, f in factors.items()}


def spectrum_from_factors(lora_b: torch.Tensor, lora_a: torch.Tensor, scaling: float) -> Spectrum:
    """SVD of s·B·A (B: out×r, A: r×in) without forming it: B = Q_b R_b, Aᵀ = Q_a R_a, SVD of R_b R_aᵀ."""
    q_b, r_b = torch.linalg.qr(lora_b.detach().to("cpu", torch.float64))
    q_a, r_a = torch.linalg.qr(lora_a.detach().to("cpu", torch.float64).T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    return Spectrum(s * abs(scaling), q_b @ u, q_a @ vh.T)


def effective_rank(values: torch.Tensor | list[float], energy: float = DEFAULT_ENERGY) -> int:
    """The fewest singular values holding `energy` of the squared spectrum (0 for a zero update)."""
    squares = torch.as_tensor(values, dtype=torch.float64).square()
    total = squares.sum()
    if total <= 0:
        return 0
    share = torch.cumsum(squares, 0) / total
    return int((share < energy - 1e-9).sum()) + 1  # tolerance: a planted 90% must not read as 89.99999%


def subspace_overlap(left_a: torch.Tensor, left_b: torch.Tensor, k: int) -> float:
    """||U_a[:, :k]ᵀ U_b[:, :k]||_F² / k: 1 for the same k-dim column space, about k/d for random ones."""
    k = max(1, min(k, left_a.shape[1], left_b.shape[1]))
    return float((left_a[:, :k].T @ left_b[:, :k]).square().sum() / k)


def energy_inside(spectrum: Spectrum, basis: Spectrum) -> float:
    """Share of `spectrum`'s squared norm that lies in the column space of `basis` (its nonzero directions)."""
    total = spectrum.values.square().sum()
    if total <= 0:
        return float("nan")
    keep = basis.values > basis.values.max() * 1e-6
    projected = (basis.left[:, keep].T @ spectrum.left).square().sum(0)  # each direction's share inside
    return float((projected * spectrum.values.square()).sum() / total)


# ---------------------------------------------------------------------------------------------
# Two adapters: do their updates live in the same subspace?


@dataclass(frozen=True)
class ModuleOverlap:
    module: str
    k: int
    overlap: float  # top-k column spaces, 1 = same
    random_baseline: float  # k / out: what two random k-dim subspaces would give
    other_in_this: float  # share of the other update's energy inside this one's column space
    this_in_other: float

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Comparison:
    other: str
    other_rank: float  # mean r of the other adapter's shared modules
    this_rank: float
    modules: tuple[ModuleOverlap, ...]
    only_here: int
    only_there: int

    @property
    def mean_overlap(self) -> float:
        return statistics.fmean(m.overlap for m in self.modules)

    @property
    def mean_random(self) -> float:
        return statistics.fmean(m.random_baseline for m in self.modules)

    @property
    def mean_other_in_this(self) -> float:
        return statistics.fmean(m.other_in_this for m in self.modules)

    @property
    def mean_this_in_other(self) -> float:
        return statistics.fmean(m.this_in_other for m in self.modules)

    @property
    def reading(self) -> str:
        """What the figures say about the larger rank: how much of its update the smaller one's subspace holds."""
        if self.other_rank == self.this_rank:
            return f"same rank; top directions overlap {self.mean_overlap:.2f} (random {self.mean_random:.2f})"
        larger, inside = ("other", self.mean_other_in_this) if self.other_rank > self.this_rank else ("this", self.mean_this_in_other)
        high = max(self.other_rank, self.this_rank)
        if inside >= 0.9:
            return f"{inside:.0%} of the rank-{high:g} ({larger}) update lies in the lower-rank one's subspace: the higher rank bought little"
        return f"{1 - inside:.0%} of the rank-{high:g} ({larger}) update lies outside the lower-rank one's subspace: the higher rank used directions the lower one lacks"

    def to_json(self) -> dict:
        return {
            "other": self.other, "other_rank": self.other_rank, "this_rank": self.this_rank,
            "mean_overlap": self.mean_overlap, "mean_random_baseline": self.mean_random,
            "mean_other_in_this": self.mean_other_in_this, "mean_this_in_other": self.mean_this_in_other,
            "reading": self.reading, "only_here": self.only_here, "only_there": self.only_there,
            "modules": [m.to_json() for m in self.modules],
        }


def compare(mine: dict[str, tuple[Spectrum, object]], theirs: dict[str, tuple[Spectrum, object]], other: str) -> Comparison:
    """Top-k subspace overlap per shared module; each value pairs a module's spectrum with its stats (effective_rank, rank)."""
    shared = [m for m in mine if m in theirs and mine[m][1].effective_rank and theirs[m][1].effective_rank]
    if not shared:
        raise LoraftError(f"--against: {other} adapts none of this adapter's modules (with a nonzero update); nothing to compare")
    rows = []
    for module in shared:
        (sa, ma), (sb, mb) = mine[module], theirs[module]
        if sa.left.shape[0] != sb.left.shape[0]:
            raise LoraftError(f"--against: {module} has output size {sa.left.shape[0]} here and {sb.left.shape[0]} in {other}; not the same model")
        k = min(ma.effective_rank, mb.effective_rank)
        rows.append(ModuleOverlap(module, k, subspace_overlap(sa.left, sb.left, k), k / sa.left.shape[0],
                                  energy_inside(sb, sa), energy_inside(sa, sb)))
    return Comparison(
        other=other,
        other_rank=statistics.fmean(theirs[m][1].rank for m in shared),
        this_rank=statistics.fmean(mine[m][1].rank for m in shared),
        modules=tuple(rows),
        only_here=len(set(mine) - set(theirs)),
        only_there=len(set(theirs) - set(mine)),
    )
