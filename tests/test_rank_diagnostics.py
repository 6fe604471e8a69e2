"""loraft inspect: planted adapters with known spectra come back with the figures we planted.

Each planted module has ΔW = U·diag(σ)·Vᵀ with chosen orthonormal U, V and singular values σ,
stored as PEFT factors B = U·diag(σ)/s, A = Vᵀ (s the module's scaling), so every reported number
has an exact expected value.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from lora_ft.model.rank_stats import BALANCED, NO_UPDATE, SATURATED, UNUSED, adapter_statistics
from lora_ft.rank_diagnostics import gradient_report, inspect_adapter
from lora_ft.model.spectra import effective_rank, spectrum_from_factors, subspace_overlap
from lora_ft.rank_report import write_report

HIDDEN, KV = 32, 16
FLAT = [1.0] * 8  # effective rank 8 of 8 -> saturated
STEEP = [4.0, 2.0, 1.0, 0.5, 0, 0, 0, 0]  # planted rank 4; 90% of the energy in 2 directions -> largely unused
STEPPED = [3.0] * 4 + [1.0] * 4  # exactly 90% in the first 4 -> effective rank 4 -> balanced
BASE_FILL = {"q_proj": 0.5, "v_proj": 0.25}  # constant base weights: ||W||_F = c * sqrt(out * in)
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "v_proj": (KV, HIDDEN)}
PLANTED = {  # (layer, type) -> singular values
    (0, "q_proj"): FLAT,
    (0, "v_proj"): STEEP,
    (1, "q_proj"): STEPPED,
    (1, "v_proj"): [2.0 * v for v in FLAT],
}


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    return q


def peft_key(layer: int, kind: str, ab: str) -> str:
    block = "self_attn" if kind.endswith(("q_proj", "v_proj")) else "mlp"
    return f"base_model.model.model.layers.{layer}.{block}.{kind}.lora_{ab}.weight"


def plant(left: torch.Tensor, right: torch.Tensor, values: list[float], scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B, A) with s·B·A = left · diag(values) · rightᵀ."""
    sigma = torch.tensor(values, dtype=torch.float64)
    return (left * sigma / scaling).float().contiguous(), right.T.float().contiguous()


def write_adapter(folder, modules: dict, *, r=8, alpha=16.0, rslora=False, rank_pattern=None, alpha_pattern=None, base=None):
    """modules: (layer, type) -> (B, A). Writes adapter_model.safetensors + adapter_config.json as PEFT does."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for (layer, kind), (b, a) in modules.items():
        tensors[peft_key(layer, kind, "A")] = a
        tensors[peft_key(layer, kind, "B")] = b
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
        "use_dora": False, "rank_pattern": rank_pattern or {}, "alpha_pattern": alpha_pattern or {},
        "target_modules": sorted({kind for _, kind in modules}), "base_model_name_or_path": str(base) if base else None,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def planted_modules(scaling=2.0, seed=0):
    out = {}
    for i, ((layer, kind), values) in enumerate(PLANTED.items()):
        rows, cols = SHAPES[kind]
        out[(layer, kind)] = plant(orthonormal(rows, 8, seed + 2 * i), orthonormal(cols, 8, seed + 2 * i + 1), values, scaling)
    return out


@pytest.fixture
def known_base(tmp_path):
    """A 'model' whose adapted weights are constants, so each ||W||_F is known exactly."""
    folder = tmp_path / "base"
    folder.mkdir()
    tensors = {}
    for layer in (0, 1):
        for kind, fill in BASE_FILL.items():
            tensors[f"model.layers.{layer}.self_attn.{kind}.weight"] = torch.full(SHAPES[kind], fill)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}), encoding="utf-8")
    return folder


@pytest.fixture
def planted_adapter(tmp_path, known_base):
    return write_adapter(tmp_path / "adapter", planted_modules(scaling=16.0 / 8), base=known_base)


def by_name(result):
    return {(m.layer, m.module_type): m for m in result.modules}


# ---------------------------------------------------------------------------------------------
# Linear algebra


def test_spectrum_from_factors_equals_svdvals_of_the_full_product():
    generator = torch.Generator().manual_seed(3)
    b, a = torch.randn(40, 6, generator=generator), torch.randn(6, 24, generator=generator)
    full = torch.linalg.svdvals(1.5 * b.double() @ a.double())
    spectrum = spectrum_from_factors(b, a, 1.5)
    assert torch.allclose(spectrum.values, full[:6], rtol=1e-10)
    rebuilt = spectrum.left @ torch.diag(spectrum.values) @ spectrum.right.T
    assert torch.allclose(rebuilt, 1.5 * b.double() @ a.double(), atol=1e-10)


def test_effective_rank_counts_the_fewest_values_holding_the_energy():
    assert effective_rank(FLAT, 0.9) == 8  # ceil(0.9 * 8): a flat spectrum needs nearly all
    assert effective_rank(STEEP, 0.9) == 2  # (16 + 4) / 21.25 = 94%
    assert effective_rank(STEPPED, 0.9) == 4  # exactly 90% counts as reached
    assert effective_rank(STEEP, 0.99) == 4
    assert effective_rank([0.0] * 8, 0.9) == 0


def test_overlap_is_one_for_the_same_subspace_and_zero_for_orthogonal_ones():
    basis = orthonormal(HIDDEN, 8, seed=5)
    rotated = basis[:, :4] @ orthonormal(4, 4, seed=6)  # same span, other basis
    assert subspace_overlap(basis[:, :4], rotated, 4) == pytest.approx(1.0, abs=1e-12)
    assert subspace_overlap(basis[:, :4], basis[:, 4:], 4) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Planted adapters


def test_reported_singular_values_effective_ranks_and_verdicts_are_the_planted_ones(planted_adapter):
    result = inspect_adapter(planted_adapter)
    stats = by_name(result)
    for key, values in PLANTED.items():
        got = torch.tensor(stats[key].singular_values, dtype=torch.float64)
        want = torch.tensor(values, dtype=torch.float64)
        nonzero = want > 0
        assert torch.allclose(got[nonzero], want[nonzero], rtol=1e-5)
        assert (got[~nonzero] < 1e-5).all()
    assert {k: m.effective_rank for k, m in stats.items()} == {(0, "q_proj"): 8, (0, "v_proj"): 2, (1, "q_proj"): 4, (1, "v_proj"): 8}
    assert {k: m.verdict for k, m in stats.items()} == {
        (0, "q_proj"): SATURATED, (0, "v_proj"): UNUSED, (1, "q_proj"): BALANCED, (1, "v_proj"): SATURATED,
    }


def test_relative_norm_divides_by_the_base_weight_norm(planted_adapter):
    stats = by_name(inspect_adapter(planted_adapter))
    for (layer, kind), values in PLANTED.items():
        update = math.sqrt(sum(v * v for v in values))
        base = BASE_FILL[kind] * math.sqrt(SHAPES[kind][0] * SHAPES[kind][1])
        assert stats[(layer, kind)].update_norm == pytest.approx(update, rel=1e-5)
        assert stats[(layer, kind)].relative_norm == pytest.approx(update / base, rel=1e-5)


def test_aggregates_by_module_type_and_layer_rank_what_changed_most(planted_adapter):
    result = inspect_adapter(planted_adapter)
    types = {g.key: g for g in result.by_type}
    assert types["q_proj"].mean_effective_rank == 6.0 and types["v_proj"].mean_effective_rank == 5.0
    rel = {k: m.relative_norm for k, m in by_name(result).items()}
    assert types["q_proj"].mean_relative_norm == pytest.approx((rel[(0, "q_proj")] + rel[(1, "q_proj")]) / 2)
    assert types["v_proj"].verdicts == {UNUSED: 1, SATURATED: 1}
    # v_proj's base is half as large per entry and half the size: its relative update is the larger
    assert result.to_json()["changed_most"]["module_types"] == ["v_proj", "q_proj"]
    assert [g.key for g in result.by_layer] == ["0", "1"]
    assert result.to_json()["changed_most"]["layers"] == ["1", "0"]
    assert result.verdict == SATURATED  # median of the rank shares [1, 0.25, 0.5, 1] is 0.75


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_follows_rank_pattern_alpha_pattern_and_rslora(tmp_path, rslora):
    r_v, alpha_v = 4, 3.0
    scale_q = 16.0 / (math.sqrt(8) if rslora else 8)
    scale_v = alpha_v / (math.sqrt(r_v) if rslora else r_v)
    q = plant(orthonormal(HIDDEN, 8, 1), orthonormal(HIDDEN, 8, 2), FLAT, scale_q)
    v = plant(orthonormal(KV, r_v, 3), orthonormal(HIDDEN, r_v, 4), [2.0, 1.0, 0.0, 0.0], scale_v)
    folder = write_adapter(tmp_path / "a", {(0, "q_proj"): q, (0, "v_proj"): v}, r=8, alpha=16.0, rslora=rslora,
                           rank_pattern={"v_proj": r_v}, alpha_pattern={"v_proj": alpha_v})
    stats = by_name(inspect_adapter(folder))
    assert stats[(0, "q_proj")].singular_values == pytest.approx(FLAT, rel=1e-5)
    assert stats[(0, "v_proj")].singular_values[:2] == pytest.approx([2.0, 1.0], rel=1e-5)
    assert (stats[(0, "v_proj")].rank, stats[(0, "v_proj")].scaling) == (r_v, pytest.approx(scale_v))
    assert stats[(0, "v_proj")].effective_rank == 2 and stats[(0, "v_proj")].verdict == BALANCED  # 2 of its own r=4


def test_missing_base_reports_the_ratio_as_missing_not_an_error(tmp_path):
    folder = write_adapter(tmp_path / "a", planted_modules(), base=tmp_path / "gone")
    result = inspect_adapter(folder)
    assert all(m.relative_norm is None for m in result.modules)
    assert "not reported" in result.base_note
    assert result.to_json()["mean_relative_norm"] is None
    assert by_name(result)[(0, "q_proj")].update_norm == pytest.approx(math.sqrt(8), rel=1e-5)


def test_a_tiny_update_warns_that_its_verdict_may_reflect_initialisation(tmp_path, known_base):
    q = plant(orthonormal(HIDDEN, 8, 1), orthonormal(HIDDEN, 8, 2), [1e-4 * v for v in FLAT], 2.0)
    result = inspect_adapter(write_adapter(tmp_path / "a", {(0, "q_proj"): q}, base=known_base))
    assert result.mean_relative_norm == pytest.approx(math.sqrt(8) * 1e-4 / (0.5 * HIDDEN), rel=1e-5)
    assert any("random initialisation" in note for note in result.notes)


def test_zero_update_reads_no_update(tmp_path):
    b, a = torch.zeros(HIDDEN, 8), orthonormal(HIDDEN, 8, 0).T.float()
    result = inspect_adapter(write_adapter(tmp_path / "a", {(0, "q_proj"): (b, a)}))
    assert result.modules[0].effective_rank == 0 and result.verdict == NO_UPDATE


def test_against_identical_subspaces_overlap_one_and_orthogonal_ones_zero(tmp_path):
    left, right = orthonormal(HIDDEN, 8, 7), orthonormal(HIDDEN, 8, 8)
    first = write_adapter(tmp_path / "a", {(0, "q_proj"): plant(left[:, :4], right[:, :4], [4, 3, 2, 1], 2.0)}, r=4, alpha=8)
    # same column space, other singular values and other row space, at a higher rank
    same = write_adapter(tmp_path / "b", {(0, "q_proj"): plant(left[:, :4], right[:, 4:], [5, 4, 3, 2], 2.0)}, r=4, alpha=8)
    other = write_adapter(tmp_path / "c", {(0, "q_proj"): plant(left[:, 4:], right[:, :4], [4, 3, 2, 1], 2.0)}, r=4, alpha=8)
    same_cmp = inspect_adapter(first, against=same).comparison
    other_cmp = inspect_adapter(first, against=other).comparison
    assert same_cmp.mean_overlap == pytest.approx(1.0, abs=1e-6)
    assert same_cmp.mean_other_in_this == pytest.approx(1.0, abs=1e-6)
    assert other_cmp.mean_overlap == pytest.approx(0.0, abs=1e-6)
    assert other_cmp.mean_other_in_this == pytest.approx(0.0, abs=1e-6)
    k = same_cmp.modules[0].k
    assert k == 3 and same_cmp.modules[0].random_baseline == pytest.approx(k / HIDDEN)


def test_against_says_when_the_higher_rank_bought_little(tmp_path):
    left, right = orthonormal(HIDDEN, 16, 9), orthonormal(HIDDEN, 16, 10)
    low = write_adapter(tmp_path / "r4", {(0, "q_proj"): plant(left[:, :4], right[:, :4], [4, 3, 2, 1], 2.0)}, r=4, alpha=8)
    # rank 16, but 99.9% of its energy in the rank-4 run's directions
    values = [4, 3, 2, 1] + [0.01] * 12
    high = write_adapter(tmp_path / "r16", {(0, "q_proj"): plant(left, right, values, 2.0)}, r=16, alpha=32)
    comparison = inspect_adapter(low, against=high).comparison
    assert comparison.mean_other_in_this > 0.999
    assert "bought little" in comparison.reading and "rank-16" in comparison.reading


def test_adapter_statistics_from_a_state_dict_matches_inspect(planted_adapter):
    from safetensors.torch import load_file

    state = load_file(str(planted_adapter / "adapter_model.safetensors"))
    config = json.loads((planted_adapter / "adapter_config.json").read_text())
    stats = adapter_statistics(state, config, {"model.layers.0.self_attn.q_proj": 4.0})
    modules = {m["module"]: m for m in stats["modules"]}
    q0 = modules["model.layers.0.self_attn.q_proj"]
    assert q0["relative_norm"] == pytest.approx(math.sqrt(8) / 4.0, rel=1e-5)
    assert modules["model.layers.0.self_attn.v_proj"]["relative_norm"] is None
    assert [m["effective_rank"] for m in stats["modules"]] == [8, 2, 4, 8]
    result = inspect_adapter(planted_adapter)
    assert stats["verdict"] == result.verdict
    # not every module has a base norm here, so types rank by mean ||dW||: v (4.61, 5.66) above q (2.83, 6.32)
    assert stats["changed_most"]["module_types"] == ["v_proj", "q_proj"]
    json.dumps(stats)  # plain JSON, for the manifest


# ---------------------------------------------------------------------------------------------
# Gradient norms


def history(values):
    return [{"step": 1 + 5 * i, "grad_norm": v, "loss": 1.0} for i, v in enumerate(values)]


def test_growing_grad_norms_point_to_a_too_high_learning_rate_or_alpha():
    report = gradient_report(history([0.5, 0.6, 0.9, 1.4, 2.5, 4.0, 7.0, 12.0]), relative_update=0.01)
    assert report.trend == "growing" and report.trend_ratio > 2
    assert "too high" in report.hint


def test_grad_norms_growing_while_the_loss_falls_are_lora_getting_going_not_an_alarm():
    """B starts at zero, so early grad norms grow as B does; with the loss falling over those steps it is no alarm."""
    rows = history([0.5, 0.6, 0.9, 1.4, 2.5, 4.0, 7.0, 12.0])
    for row, loss in zip(rows, (1.4, 1.1, 0.8, 0.5, 0.3, 0.2, 0.15, 0.1)):
        row["loss"] = loss
    report = gradient_report(rows, relative_update=0.01)
    assert report.trend == "growing while the loss falls" and report.trend_ratio > 2
    assert report.hint == "no sign of an alpha or learning-rate problem"


def test_spikes_are_values_five_times_the_median_after_the_first_step():
    report = gradient_report(history([9.0, 1.0, 1.1, 0.9, 6.0, 1.0, 1.0, 7.0, 1.0, 1.0, 50.0]), relative_update=0.01)
    assert report.values == (9.0, 1.0, 1.1, 0.9, 6.0, 1.0, 1.0, 7.0, 1.0, 1.0)  # the first 10 logged
    assert report.median == 1.0 and report.max == 9.0
    assert report.spikes == ((21, 6.0), (36, 7.0))  # step 1's 9.0 is not a spike: the first step is the largest by nature
    assert "too high" in report.hint


def test_non_finite_grad_norm_names_its_step():
    report = gradient_report(history([1.0, 0.8, float("nan"), 0.7]), relative_update=None)
    assert report.nonfinite_step == 11 and "step 11" in report.hint


def test_an_update_larger_than_the_weights_points_to_a_too_high_learning_rate_or_alpha():
    report = gradient_report(history([1.0, 0.9, 0.8, 0.8, 0.7]), relative_update=3.0)
    assert report.trend == "steady" and report.spikes == ()
    assert "3x the size of the weights" in report.hint and "too high" in report.hint


def test_tiny_update_with_healthy_gradients_points_to_too_low_scaling():
    report = gradient_report(history([1.0, 0.9, 0.8, 0.8, 0.7]), relative_update=2e-4)
    assert report.trend == "steady" and "too low" in report.hint


def test_shrinking_grad_norms_and_a_real_update_raise_no_alarm():
    report = gradient_report(history([1.5, 0.7, 0.14, 0.17, 0.15, 0.13]), relative_update=0.007)
    assert report.trend == "shrinking" and report.spikes == ()
    assert report.hint == "no sign of an alpha or learning-rate problem"


# ---------------------------------------------------------------------------------------------
# Verdicts on adapters that were actually trained


def train_regression_adapter(folder, target_rank: int, rank: int = 8, dim: int = 32, steps: int = 150):
    """Fit a LoRA (PEFT, default init: B = 0) on one linear layer to a target update of known rank."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(dim, dim, bias=False))
    target = orthonormal(dim, target_rank, 11) @ orthonormal(dim, target_rank, 12).T  # flat spectrum of rank target_rank
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"]))
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    inputs = torch.randn(256, dim)
    wanted = peft_model(inputs).detach() + inputs @ target.float().T
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 32x32 matmuls: a second thread only adds sync cost on busy cores
    try:
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(peft_model(inputs), wanted).backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    peft_model.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize(
    "directions, effective, verdict",
    [(1, 1, UNUSED), (4, 4, BALANCED), (32, 8, SATURATED)],
    ids=["one-direction", "four-directions", "more-directions-than-rank"],
)
def test_rank_8_adapter_trained_on_a_task_of_known_rank_gets_the_matching_verdict(tmp_path, directions, effective, verdict):
    result = inspect_adapter(train_regression_adapter(tmp_path / "a", target_rank=directions))
    assert result.modules[0].effective_rank == effective
    assert result.verdict == verdict
    assert result.modules[0].singular_values[0] == pytest.approx(1.0, rel=0.01)  # the target's singular values are 1


# ---------------------------------------------------------------------------------------------
# Report files and the training manifest


def test_report_folder_holds_json_and_charts_and_nothing_else(planted_adapter, tmp_path):
    result = inspect_adapter(planted_adapter)
    out = write_report(result, tmp_path / "report")
    assert sorted(p.name for p in out.iterdir()) == ["inspect.json", "spectra.png", "update_norm_by_layer.png"]
    data = json.loads((out / "inspect.json").read_text())
    assert data["verdict"] == result.verdict and len(data["modules"]) == 4
    assert (out / "spectra.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder left behind"


def test_report_refuses_a_folder_holding_other_files(planted_adapter, tmp_path):
    from lora_ft.errors import LoraftError

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(LoraftError, match="other files"):
        write_report(inspect_adapter(planted_adapter), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir):
    """One real `loraft train` run on the tiny model (about 3 s), shared by the tests below."""
    from conftest import tiny_run_config

    from lora_ft.config_io import validate_dict
    from lora_ft.train import train

    root = tmp_path_factory.mktemp("inspect_run")
    cfg = tiny_run_config(root, tiny_model_dir, eval_rows=False)
    return train(validate_dict(cfg)).run_dir


def test_train_records_the_inspect_statistics_in_the_manifest(trained_run):
    stats = json.loads((trained_run / "manifest.json").read_text())["adapter_stats"]
    result = inspect_adapter(trained_run)
    assert len(stats["modules"]) == len(result.modules) == 2 * 7  # 2 layers x all-linear (q k v o gate up down)
    for recorded, inspected in zip(stats["modules"], result.modules):
        assert recorded["module"] == inspected.module
        assert recorded["effective_rank"] == inspected.effective_rank
        assert recorded["relative_norm"] == pytest.approx(inspected.relative_norm, rel=1e-5)  # base norms in memory vs on disk
        assert recorded["relative_norm"] > 0
    assert stats["verdict"] == result.verdict
    assert result.gradients is not None and len(result.gradients.values) == 7  # steps 1, 5, ..., 30 at logging_steps 5


def test_cli_inspect_prints_tables_and_writes_the_report(trained_run, tmp_path, run_cli):
    code, out, err = run_cli("inspect", trained_run, "--report", tmp_path / "report")
    assert code == 0, err
    for heading in ("By module type", "By layer", "Largest updates", "verdict", "grad norms", "heuristic:"):
        assert heading in out
    assert all(kind in out for kind in ("q_proj", "down_proj"))
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["inspect.json", "spectra.png", "update_norm_by_layer.png"]


def test_cli_inspect_against_itself_reports_full_overlap(trained_run, run_cli):
    code, out, _ = run_cli("inspect", trained_run, "--against", trained_run)
    assert code == 0
    assert "top-k column-space overlap 1.000" in out


def test_cli_inspect_on_a_folder_without_an_adapter_exits_2_with_one_line(tmp_path, run_cli):
    code, out, err = run_cli("inspect", tmp_path)
    assert code == 2
    assert err.strip().count("\n") == 0 and err.startswith("error: ADAPTER_DIR:") and "no adapter" in err
    assert out == ""


def test_cli_inspect_refuses_an_energy_outside_0_1(planted_adapter, run_cli):
    code, _, err = run_cli("inspect", planted_adapter, "--energy", "1.5")
    assert code == 2 and "--energy" in err


@pytest.mark.slow
def test_gguf_base_norms_come_from_the_dequantized_weights(tmp_path, quickstart_gguf):
    """The quickstart base is a .gguf file: its norms are read through transformers, and match gguf's own reader."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(quickstart_gguf))
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    # llama.cpp permutes q/k rows; a row permutation leaves the Frobenius norm unchanged
    expected = float(np.linalg.norm(gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float64)))
    q = plant(orthonormal(576, 4, 1), orthonormal(576, 4, 2), [2.0, 1.0, 0.5, 0.25], 2.0)
    folder = write_adapter(tmp_path / "a", {(0, "q_proj"): q}, r=4, alpha=8, base=quickstart_gguf)
    module = inspect_adapter(folder).modules[0]
    assert module.base_norm == pytest.approx(expected, rel=1e-5)
    assert module.relative_norm == pytest.approx(math.sqrt(4 + 1 + 0.25 + 0.0625) / expected, rel=1e-5)
