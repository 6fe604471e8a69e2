"""Advice: is the run sized right? Learning rate, rank, targets, batch, alpha and epochs checked against
what is published, before the run (from the config, the model's config shapes and the supervised-token
count; no weights), and what the run did checked against that advice afterwards.

`advise` is pure: typed inputs in, frozen `Finding`s out, one rule per function, each citing its source.
Advice never blocks a run; `advice.off: [name, ...]` silences a rule by name before and after the run.
`after_run` reads a `RunOutcome` (built by rank_diagnostics from the adapter's spectra, update norms and
the logged losses) and says which pre-run finding the outcome confirms.

The pitfall it guards: the learning-rate formula of "LoRA Without Regret" assumes alpha = 32 with the
1/r scale; with another scale the same learning rate is a different step (Adam moves B by ~lr per step,
so dW moves by ~scale x lr), so the target is rescaled rather than compared as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Literal, get_args

from lora_ft.config import AdviceRule, RunConfig
from lora_ft.model.coverage import ATTENTION, DENSE_MLP, EMBEDDINGS, ROUTED, SHARED
from lora_ft.training.distributed import effective_batch, world_size
from lora_ft.artifacts.findings import Finding

RULES: tuple[str, ...] = get_args(AdviceRule)

LWR = "Schulman et al., 'LoRA Without Regret', Thinking Machines Lab, 2025 (thinkingmachines.ai/blog/lora)"
LORA_PAPER = "Hu et al. 2021, 'LoRA', arXiv 2106.09685, sec. 4.1"
TRL_LWR = "TRL docs, 'LoRA Without Regret' (huggingface.co/docs/trl/lora_without_regret)"
DATA_CONSTRAINED = "Muennighoff et al. 2023, 'Scaling Data-Constrained Language Models', arXiv 2305.16264"

# LR = 5e-5 x 10 x (2000 / hidden_size)^P: LWR's fit of the best LoRA learning rate (full fine-tuning's
# 5e-5 times their factor 10, Tinker's get_lr). Calibrated on Llama 3 and Qwen 3 only.
FULL_FT_LR, LORA_FACTOR, REFERENCE_HIDDEN = 5e-5, 10.0, 2000
EXPONENT = {"llama": 0.781, "qwen": 0.0775}
FAMILY_OF = {"qwen": "qwen"}  # model_type prefix -> calibrated family; everything else is nearest to llama
REFERENCE_ALPHA = 32  # LWR: alpha 32 with the 1/r scale, so the best LR does not move with rank
LR_LOW, LR_HIGH = 1 / 3, 5.0  # their sweeps: the best LR sat within these of the fit; 3e-3 diverged in 72 of 80 failures
MAX_BATCH = 32  # TRL's reproduction of LWR keeps the effective batch at or under 32 sequences
MAX_EPOCHS = 4  # past ~4 epochs repeated tokens are worth rapidly less (data-constrained scaling)
SUGGESTED_EPOCHS = 3

# Preference methods start from a model that already answers well; their published learning rates are for
# full fine-tuning, ~20-100x below SFT's. LoRA takes LWR's factor 10 on top (the Zephyr recipes: DPO at 5e-7
# full, 5e-6 QLoRA). training.method picks the row; orpo and simpo are ready for when loraft trains them.
PREFERENCE_LR = {
    "dpo": (5e-7, "Tunstall et al. 2023, 'Zephyr', arXiv 2310.16944; alignment-handbook recipes/zephyr-7b-beta/dpo: "
                  "5e-7 full, 5e-6 QLoRA"),
    "kto": (1e-6, "TRL KTOConfig default learning_rate 1e-6; TRL KTO docs: at beta 0.1 stay at or under 1e-6, within 5e-7..5e-6"),
    "orpo": (1e-6, "TRL ORPOConfig default learning_rate 1e-6 (Hong et al. 2024, 'ORPO', arXiv 2403.07691)"),
    "simpo": (1e-6, "Meng et al. 2024, 'SimPO', arXiv 2405.14734: 3e-7..1e-6 full; TRL CPOConfig default 1e-6"),
}
# Those rates were set for 7B models (Zephyr is Mistral-7B, hidden 4096); other sizes keep the same factor below the
# SFT formula's rate (an extrapolation: the sources give one size).
PREFERENCE_HIDDEN = 4096


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class ModelShapes:
    """What the rules read from the model's config and the planned targets (coverage.Coverage)."""

    model_type: str
    hidden_size: int
    lora_params: int  # LoRA factor parameters over the targets at the configured rank (no embeddings)
    attention_reached: bool
    mlp_present: bool
    mlp_reached: bool
    experts_present: bool
    experts_reached: bool


@dataclass(frozen=True)
class DataSize:
    train_rows: int
    supervised_tokens: int  # tokens in the loss over the train split, one pass, after truncation
    has_eval: bool


def shapes_from(model_config, coverage) -> ModelShapes:
    """Read hidden size and model type from a transformers config, the rest from coverage.Coverage."""
    def present(name) -> bool:
        return coverage.block(name) is not None and coverage.block(name).weights > 0

    def reached(name) -> bool:
        return coverage.block(name) is not None and coverage.block(name).reached > 0

    return ModelShapes(
        model_type=str(getattr(model_config, "model_type", "") or ""),
        hidden_size=int(_text_config(model_config).hidden_size),
        lora_params=sum(b.trainable for b in coverage.blocks if b.block != EMBEDDINGS),  # not trainable token rows
        attention_reached=reached(ATTENTION),
        mlp_present=present(DENSE_MLP) or present(SHARED),
        mlp_reached=reached(DENSE_MLP) or reached(SHARED),
        experts_present=present(ROUTED),
        experts_reached=reached(ROUTED),
    )


def _text_config(model_config):
    return model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config


def data_size_from(data_check, data: dict | None) -> DataSize | None:
    """From data_check.DataCheckResult (its train split's length statistics) and preflight's row counts."""
    if data_check is None or not data_check.splits or (data_check.splits[0].tokens or {}).get("trained") is None:
        return None
    train = data_check.splits[0]
    return DataSize(train.rows - train.bad_rows, int(train.tokens["trained"]), bool(data and data.get("eval_rows")))


# ---------------------------------------------------------------------------------------------
# Before the run


@dataclass(frozen=True)
class Advice:
    findings: tuple[Finding, ...]
    off: tuple[str, ...] = ()

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.level == "warn")

    def summary(self) -> str:
        head = f"advice      {len(self.warnings)} warning(s)" + (f"; off: {', '.join(self.off)}" if self.off else "")
        return "\n".join([head, *(f"  {line}" for f in self.findings for line in f.lines())])

    def to_json(self) -> dict:
        return {"findings": [f.model_dump(mode="json") for f in self.findings], "off": list(self.off)}


def advise(cfg: RunConfig, shapes: ModelShapes, data: DataSize | None, *, processes: int | None = None) -> Advice:
    """Every rule not in cfg.advice.off, in a fixed order. Pure: reads only its arguments."""
    batch = effective_batch(cfg, processes)
    epochs = planned_epochs(cfg, data, batch)
    rules = {
        "learning_rate": lambda: learning_rate_rule(cfg, shapes),
        "rank": lambda: rank_rule(cfg, shapes, data, epochs),
        "targets": lambda: targets_rule(cfg, shapes),
        "batch": lambda: batch_rule(cfg, batch, processes),
        "alpha": lambda: alpha_rule(cfg),
        "epochs": lambda: epochs_rule(cfg, data, epochs, batch),
    }
    off = tuple(cfg.advice.off)
    found = (rules[name]() for name in RULES if name not in off)
    return Advice(tuple(f for f in found if f is not None), off)


def planned_epochs(cfg: RunConfig, data: DataSize | None, batch: int) -> float | None:
    """Passes over the train rows the run will make: training.epochs, or max_steps x effective batch / rows."""
    if cfg.training.max_steps is None:
        return float(cfg.training.epochs)
    if data is None or data.train_rows == 0:
        return None
    return cfg.training.max_steps * batch / data.train_rows


def family(model_type: str) -> tuple[str, bool]:
    """(the calibrated family whose exponent applies, whether model_type is that family itself)."""
    for prefix, name in FAMILY_OF.items():
        if model_type.startswith(prefix):
            return name, True
    return "llama", model_type.startswith("llama")


def formula_lr(hidden_size: int, model_type: str) -> float:
    """LWR's best LoRA learning rate at alpha 32 (scale 32/r): 5e-5 x 10 x (2000 / hidden)^P."""
    return FULL_FT_LR * LORA_FACTOR * (REFERENCE_HIDDEN / hidden_size) ** EXPONENT[family(model_type)[0]]


def scale_factor(cfg: RunConfig) -> float:
    """How much larger than LWR's reference scale (32/r) this run's alpha scale is."""
    return cfg.lora.scaling / (REFERENCE_ALPHA / cfg.lora.rank)


def learning_rate_rule(cfg: RunConfig, shapes: ModelShapes) -> Finding:
    lr, method = cfg.training.learning_rate, cfg.training.method
    fam, own = family(shapes.model_type)
    raw = formula_lr(shapes.hidden_size, shapes.model_type)
    scale = scale_factor(cfg)
    target = raw / scale
    said = "" if own else f"; {shapes.model_type or 'this model'} has no calibrated exponent, the nearest known family {fam}'s is used"
    scaled = "" if math.isclose(scale, 1.0, rel_tol=1e-6) else f", / {scale:.3g} for alpha scale {cfg.lora.scaling:g} vs 32/r"
    basis = f"LoRA Without Regret for {fam} at hidden {shapes.hidden_size}" + (f": {raw:.2g}{scaled}" if scaled else "")
    why = (f"LoRA's best learning rate is ~10x full fine-tuning's: 5e-5 x 10 x (2000/hidden)^{EXPONENT[fam]} at "
           f"alpha 32{said}; a full fine-tuning rate (2e-5) on LoRA is the usual mistake")
    source = f"{LWR}; {LORA_PAPER} (with Adam, alpha acts as a learning-rate multiplier)"
    if method in PREFERENCE_LR:
        full, cited = PREFERENCE_LR[method]
        below = full / (formula_lr(PREFERENCE_HIDDEN, "llama") / LORA_FACTOR)  # vs SFT's full rate at that size
        target *= below
        basis += f", x {below:.3g} for {method}"
        why = (f"{method}'s published full fine-tuning rate ({full:.0e}, 7B models of hidden {PREFERENCE_HIDDEN}) is "
               f"{below:.3g}x the SFT full fine-tuning rate the formula gives there; the same factor is kept at this "
               f"size, with LoRA's 10x on top (at hidden {PREFERENCE_HIDDEN}: {LORA_FACTOR * full:.0e})")
        source = f"{cited}; {LWR}"
    suggested = float(f"{target:.2g}")
    ratio = lr / suggested  # against the value shown, so the band is the one the user reads
    what = f"{lr:g} is {ratio:.2g}x the suggested {suggested:g} ({basis})"
    if ratio < LR_LOW or ratio > LR_HIGH:
        side = "too low" if ratio < LR_LOW else "too high"
        return Finding(name="learning_rate", level="warn", what=f"{side}: {what}", why=why, source=source, value=lr,
                       suggested=suggested, set=(f"training.learning_rate={suggested:g}",))
    return Finding(name="learning_rate", level="ok", what=what, why=why, source=source, value=lr)


def rank_rule(cfg: RunConfig, shapes: ModelShapes, data: DataSize | None, epochs: float | None) -> Finding:
    rank, params = cfg.lora.rank, shapes.lora_params
    why = ("LoRA keeps up with full fine-tuning while its parameter count is at least the number of supervised "
           "(in-the-loss) tokens it learns; past that it trains less efficiently")
    if data is None or data.supervised_tokens == 0:
        return Finding(name="rank", level="info", what=f"r={rank}: {params:,} LoRA parameters; supervised tokens unknown "
                       "(no data, or data.checks.lengths is off)", why=why, source=LWR, value=rank)
    seen = data.supervised_tokens * min(1.0, epochs or 1.0)  # distinct tokens: a short max_steps run sees fewer
    per_rank = params / rank
    needed = max(1, math.ceil(seen / per_rank))
    what = f"r={rank}: {params:,} LoRA parameters for {seen:,.0f} supervised tokens ({params / max(seen, 1):.2g} per token)"
    if params >= seen:
        return Finding(name="rank", level="ok", what=what, why=why, source=LWR, value=rank)
    suggested = 1 << (needed - 1).bit_length()
    return Finding(name="rank", level="warn", what=f"too few LoRA parameters: {what}; r >= {needed} would cover them",
                   why=why, source=LWR, value=rank, suggested=suggested, set=(f"lora.rank={suggested}",))


def targets_rule(cfg: RunConfig, shapes: ModelShapes) -> Finding:
    why = ("attention-only LoRA underperforms even at a matched parameter count; adapt the MLP and MoE experts, "
           "where most of the weights are")
    target = cfg.lora.target_modules
    if shapes.experts_present and not shapes.experts_reached:
        fix = "lora.target_experts=true" if target in ("all-linear", "mlp") else "lora.target_modules=all-linear"
        return Finding(name="targets", level="warn", what="the routed experts are not adapted (frozen)", why=why,
                       source=LWR, value=str(target), suggested="experts adapted", set=(fix,))
    if shapes.attention_reached and shapes.mlp_present and not shapes.mlp_reached:
        return Finding(name="targets", level="warn", what="attention only: no MLP layer is adapted", why=why,
                       source=LWR, value=str(target), suggested="all-linear", set=("lora.target_modules=all-linear",))
    return Finding(name="targets", level="ok", what="the targets reach the MLP" + (" and the experts" if shapes.experts_reached else ""),
                   why=why, source=LWR, value=str(target))


def batch_rule(cfg: RunConfig, batch: int, processes: int | None) -> Finding:
    why = ("LoRA pays a larger loss penalty than full fine-tuning as the batch grows, and a higher rank does not "
           f"remove it; TRL's reproduction keeps the effective batch at or under {MAX_BATCH} sequences (soft: LWR's "
           "sweeps also ran 128)")
    source = f"{LWR}; {TRL_LWR}"
    t, procs = cfg.training, processes or world_size()
    what = (f"effective batch {batch} sequences (batch_size {t.batch_size} x accumulation {t.gradient_accumulation_steps}"
            f" x {procs} process{'es' if procs > 1 else ''})")
    if batch <= MAX_BATCH:
        return Finding(name="batch", level="ok", what=what, why=why, source=source, value=batch)
    per_step = t.batch_size * procs
    if per_step <= MAX_BATCH:
        fix = (f"training.gradient_accumulation_steps={max(1, MAX_BATCH // per_step)}",)
    else:
        fix = (f"training.batch_size={max(1, MAX_BATCH // procs)}", "training.gradient_accumulation_steps=1")
    return Finding(name="batch", level="warn", what=f"large: {what}", why=why, source=source, value=batch,
                   suggested=MAX_BATCH, set=fix)


def alpha_rule(cfg: RunConfig) -> Finding | None:
    """Info only: the learning-rate rule already rescales its target; this says why and how to stop it moving."""
    lora = cfg.lora
    scale = scale_factor(cfg)
    if math.isclose(scale, 1.0, rel_tol=1e-6):
        return None
    policy = "alpha = 2r (the default) keeps the scale at 2" if lora.alpha is None else f"alpha {lora.resolved_alpha:g}"
    rs = " with rsLoRA (alpha/sqrt(r))" if lora.use_rslora else ""
    what = (f"r={lora.rank}, {policy}{rs}: the update scale {lora.scaling:g} is {scale:.3g}x the 32/r the learning-rate "
            f"formula assumes, so the best learning rate is {1 / scale:.3g}x the formula's (the learning_rate line "
            "already applies it); a fixed alpha 32 keeps it put across ranks")
    why = ("with a fixed alpha and the 1/r scale the best learning rate barely moves with rank; with alpha = 2r it "
           "moves as 1/r; with Adam, tuning alpha is roughly tuning the learning rate. rsLoRA's alpha/sqrt(r) matters "
           "at high rank")
    return Finding(name="alpha", level="info", what=what, why=why,
                   source=f"{LWR}; {LORA_PAPER}; Kalajdzievski 2023, 'rsLoRA', arXiv 2312.03732",
                   value=lora.resolved_alpha, suggested=REFERENCE_ALPHA, set=(f"lora.alpha={REFERENCE_ALPHA}",))


def epochs_rule(cfg: RunConfig, data: DataSize | None, epochs: float | None, batch: int) -> Finding | None:
    why = (f"past ~{MAX_EPOCHS} epochs repeated tokens are worth rapidly less than new ones; on a small set the "
           "held-out loss turns up while the train loss keeps falling")
    if epochs is None:
        return None
    rows = f" of {data.train_rows:,} train rows" if data is not None else ""
    what = f"{epochs:.3g} passes{rows}"
    if epochs <= MAX_EPOCHS:
        if data is not None and not data.has_eval and epochs > 1:
            return Finding(name="epochs", level="info", what=f"{what} with no held-out data: overfitting cannot be seen",
                           why=why, source=DATA_CONSTRAINED, value=round(epochs, 3), suggested=0.05,
                           set=("data.eval_fraction=0.05",))
        return Finding(name="epochs", level="ok", what=what, why=why, source=DATA_CONSTRAINED, value=round(epochs, 3))
    if cfg.training.max_steps is not None and data is not None:
        steps = max(1, math.ceil(SUGGESTED_EPOCHS * data.train_rows / batch))
        fix, suggested = (f"training.max_steps={steps}",), steps
    else:
        fix, suggested = (f"training.epochs={SUGGESTED_EPOCHS}",), SUGGESTED_EPOCHS
    return Finding(name="epochs", level="warn", what=f"likely to overfit: {what}", why=why, source=DATA_CONSTRAINED,
                   value=round(epochs, 3), suggested=suggested, set=fix)


# ---------------------------------------------------------------------------------------------
# After the run


@dataclass(frozen=True)
class RunOutcome:
    """What the run did, as rank_diagnostics reads it (verdict names and thresholds: model/rank_stats.py)."""

    rank: int
    rank_verdict: str | None  # model/rank_stats.py's verdict, as shown
    saturated: bool
    unused: bool
    median_rank_used: float | None
    update: Literal["tiny", "huge", "fine"] | None  # mean ||dW||/||W|| against rank_diagnostics' thresholds
    relative_norm: float | None
    gradients_too_high: str | None  # the gradient report's hint when it points at a too high rate
    losses: tuple[float, ...]  # logged train losses, in order
    evals: tuple[tuple[float, float], ...]  # (epoch, held-out loss) per evaluation


SPIKE = 2.0  # a logged train loss above SPIKE x the lowest one before it ...
SPIKE_FLOOR = 0.1  # ... and above it by this share of the first logged loss: near convergence (0.018 -> 0.036 nats
# after 1.35 at the start, the quickstart's) a doubling is batch noise, not a step too large
RISE = 1.02  # the last held-out loss above RISE x the lowest one


def after_run(outcome: RunOutcome, before: Sequence[Finding] = (), off: Sequence[str] = ()) -> tuple[Finding, ...]:
    """Connect what happened to the pre-run advice: rank saturated or unused, updates too small for the scale,
    loss spikes or divergence, held-out loss rising while train loss falls."""
    prior = {f.name: f for f in before}
    found = [_rank_after(outcome, prior.get("rank")), _lr_after(outcome, prior.get("learning_rate")),
             _epochs_after(outcome, prior.get("epochs"))]
    return tuple(f for f in found if f is not None and f.name not in off)


def _said(prior: Finding | None) -> str:
    if prior is None:
        return "no advice was recorded before the run"
    return f"before the run: {prior.level} ({prior.what})"


def _rank_after(o: RunOutcome, prior: Finding | None) -> Finding | None:
    why = "effective rank (90% of the squared spectrum) against r, from the adapter's singular values"
    used = f" (median module uses {o.median_rank_used:.0%} of r={o.rank})" if o.median_rank_used is not None else ""
    if o.saturated:
        suggested = prior.suggested if prior is not None and prior.level == "warn" else o.rank * 2
        agrees = "agrees with" if prior is not None and prior.level == "warn" else "goes beyond"
        return Finding(name="rank", level="warn", when="after", what=f"rank saturated{used}; this {agrees} the advice "
                       f"({_said(prior)})", why=why, source=f"loraft inspect; {LWR}", value=o.rank, suggested=suggested,
                       set=(f"lora.rank={suggested}",))
    if o.unused and o.median_rank_used is not None:
        smaller = max(1, 1 << max(0, math.ceil(o.rank * o.median_rank_used) - 1).bit_length())
        return Finding(name="rank", level="info", when="after", what=f"rank largely unused{used}: r={smaller} would "
                       f"hold the update ({_said(prior)})", why=why, source="loraft inspect", value=o.rank,
                       suggested=smaller, set=(f"lora.rank={smaller}",))
    if o.rank_verdict is None:
        return None
    return Finding(name="rank", level="ok", when="after", what=f"rank {o.rank_verdict}{used}", why=why,
                   source="loraft inspect", value=o.rank)


def _lr_after(o: RunOutcome, prior: Finding | None) -> Finding | None:
    finite = [x for x in o.losses if math.isfinite(x)]
    diverged = len(finite) < len(o.losses) or (len(finite) >= 4 and finite[-1] > finite[0])
    spikes = sum(1 for i, x in enumerate(finite[2:], 2)
                 if x > SPIKE * min(finite[:i]) and x - min(finite[:i]) > SPIKE_FLOOR * abs(finite[0]))
    flagged = prior is not None and prior.level == "warn"
    if diverged or spikes or o.gradients_too_high or o.update == "huge":
        what = ("train loss diverged (non-finite or ended above its start)" if diverged else
                f"{spikes} train-loss spike(s) above {SPIKE:g}x the lowest before" if spikes else
                o.gradients_too_high if o.gradients_too_high else
                f"the update is {o.relative_norm:.3g}x the weights it adapts")
        suggested = prior.suggested if flagged and "too high" in prior.what else None
        return Finding(name="learning_rate", level="warn", when="after",
                       what=f"learning rate or alpha likely too high: {what} ({_said(prior)})",
                       why="loss spikes, divergence and updates larger than the weights are the signs of too large a step",
                       source=f"loraft inspect; {LWR}", suggested=suggested,
                       set=(f"training.learning_rate={suggested:g}",) if suggested else ())
    if o.update == "tiny":
        suggested = prior.suggested if flagged and "too low" in prior.what else None
        return Finding(name="learning_rate", level="warn", when="after",
                       what=f"updates too small for the scale: mean ||dW||/||W|| {o.relative_norm:.1e}; learning rate or "
                       f"alpha likely too low ({_said(prior)})",
                       why="with finite gradients a tiny update means the step (learning rate x alpha scale) was small",
                       source=f"loraft inspect; {LORA_PAPER}", suggested=suggested,
                       set=(f"training.learning_rate={suggested:g}",) if suggested else ())
    if not finite:
        return None
    seen = f"no spike or divergence in {len(finite)} logged losses" + (
        f", update {o.relative_norm:.2g} of the weights" if o.relative_norm is not None else "")
    # The run shows no sign either way; a rate flagged before the run stays flagged (the run cannot show what it missed).
    return Finding(name="learning_rate", level="info" if flagged else "ok", when="after",
                   what=f"{seen}; the pre-run warning stands ({_said(prior)})" if flagged else seen,
                   why="loss spikes, divergence and update size are the signs of a wrong step size",
                   source=f"loraft inspect; {LWR}" if flagged else "loraft inspect", suggested=prior.suggested if flagged else None,
                   set=prior.set if flagged else ())


def _epochs_after(o: RunOutcome, prior: Finding | None) -> Finding | None:
    if len(o.evals) < 2:
        return None
    best = min(range(len(o.evals)), key=lambda i: o.evals[i][1])
    last_epoch, last = o.evals[-1]
    best_epoch, lowest = o.evals[best]
    train_fell = len(o.losses) >= 2 and o.losses[-1] < o.losses[0]
    why = "held-out loss rising while train loss falls is overfitting: the run repeated its data too often"
    if best < len(o.evals) - 1 and last > RISE * lowest and train_fell:
        suggested = max(1, math.ceil(best_epoch))
        return Finding(name="epochs", level="warn", when="after",
                       what=f"overfitting: held-out loss {lowest:.4g} at epoch {best_epoch:.3g} rose to {last:.4g} by "
                       f"epoch {last_epoch:.3g} while train loss fell ({_said(prior)})",
                       why=why, source=DATA_CONSTRAINED, suggested=suggested, set=(f"training.epochs={suggested}",))
    return Finding(name="epochs", level="ok", when="after",
                   what=f"held-out loss {o.evals[0][1]:.4g} -> {last:.4g}, lowest at epoch {best_epoch:.3g}",
                   why=why, source=DATA_CONSTRAINED)
