"""The adapter on disk has one reader: merge, inspect, export and serve agree on every module's scale, and they
refuse a broken adapter_config.json with the same one line (exit 2)."""

from __future__ import annotations

import json
import math
import shutil
import socket
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from lora_ft.artifacts.adapter import AdapterConfig, lora_scale
from lora_ft.artifacts.adapter_run import AdapterRun
from lora_ft.errors import LoraftError

ALPHA, R = 8.0, 4  # the tiny run's lora.alpha and lora.rank


def rslora_with_patterns(tiny_run: Path, folder: Path) -> Path:
    """The tiny run as an rsLoRA adapter with v_proj at rank 2 (its first 2 directions kept) and up_proj at
    alpha 4: a valid PEFT adapter whose modules have three different scales."""
    shutil.copytree(tiny_run, folder, ignore=shutil.ignore_patterns("checkpoints"))
    state = load_file(folder / "adapter_model.safetensors")
    for key, tensor in state.items():
        if ".v_proj.lora_A" in key:
            state[key] = tensor[:2].contiguous()
        elif ".v_proj.lora_B" in key:
            state[key] = tensor[:, :2].contiguous()
    save_file(state, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"up_proj": 4.0})
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def expected_scale(module: str) -> float:
    if module.endswith("v_proj"):
        return ALPHA / math.sqrt(2)
    if module.endswith("up_proj"):
        return 4.0 / math.sqrt(R)
    return ALPHA / math.sqrt(R)


def without_alpha(tiny_run: Path, folder: Path) -> Path:
    shutil.copytree(tiny_run, folder, ignore=shutil.ignore_patterns("checkpoints"))
    config = json.loads((folder / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------------------------------


def test_merge_inspect_export_and_serve_compute_the_same_scale_for_rslora_with_patterns(tiny_run, tmp_path):
    from lora_ft.export import trained_modules
    from lora_ft.merge import merge
    from lora_ft.rank_diagnostics import inspect_adapter
    from lora_ft.serving.batching import ModelPool

    folder = rslora_with_patterns(tiny_run, tmp_path / "run")
    modules = sorted(m.module for m in trained_modules(AdapterRun.load(folder)))
    assert len(modules) >= 6 and {expected_scale(m) for m in modules} == {4.0, ALPHA / math.sqrt(2), 2.0}

    exported = {m.module: m.scale for m in trained_modules(AdapterRun.load(folder))}
    inspected = {m.module: m.scaling for m in inspect_adapter(folder).modules}
    manifest = merge(folder, tmp_path / "merged").manifest
    merged = dict(zip(sorted(manifest.adapted_tensors), manifest.scalings))
    pool = ModelPool.load({"app": folder})
    served = {name.removeprefix("base_model.model."): float(layer.scaling["app"])
              for name, layer in pool.model.named_modules() if isinstance(getattr(layer, "scaling", None), dict)}

    for module in modules:
        want = pytest.approx(expected_scale(module), rel=1e-9)
        assert exported[module] == want, module
        assert inspected[module] == want, module
        assert merged[f"{module}.weight"] == want, module
        assert served[module] == want, module  # PEFT itself, as serve loads the folder
    assert set(inspected) == set(exported) == set(served) == set(modules)


@pytest.mark.parametrize("command", ["merge", "inspect", "export", "serve", "generate"])
def test_an_adapter_without_lora_alpha_is_one_clear_error_exit_2_everywhere(command, tiny_run, tmp_path, run_cli):
    folder = without_alpha(tiny_run, tmp_path / "run")
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    args = {
        "merge": ["merge", "--adapter", folder, "--out", out],
        "inspect": ["inspect", folder],
        "export": ["export", folder, "--to", "vllm", "--out", out],
        "serve": ["serve", "--adapter", f"app={folder}", "--port", str(_free_port())],
        "generate": ["generate", "--adapter", folder, "--prompts", prompts, "--out", out, "--max-new-tokens", "2"],
    }[command]
    code, stdout, stderr = run_cli(*args)
    assert code == 2, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "lora_alpha is missing" in lines[0] and str(folder / "adapter_config.json") in lines[0]
    assert not out.exists()


def test_the_scale_rule_is_alpha_over_r_or_over_sqrt_r_with_rslora():
    assert lora_scale(16, 4, False) == 4.0 and lora_scale(16, 4, True) == 8.0
    config = AdapterConfig.parse({"r": 8, "lora_alpha": 16, "use_rslora": True,
                                  "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"layers.0.self_attn.q_proj": 4}})
    assert config.scale_for("model.layers.1.self_attn.k_proj") == pytest.approx(16 / math.sqrt(8))
    assert config.scale_for("model.layers.1.self_attn.v_proj") == pytest.approx(16 / math.sqrt(2))
    assert config.scale_for("model.layers.0.self_attn.q_proj") == pytest.approx(4 / math.sqrt(8))
    assert config.scale_for("model.layers.10.self_attn.q_proj") == pytest.approx(16 / math.sqrt(8))


def test_the_lora_spec_scaling_training_reports_is_the_same_rule():
    from lora_ft.config import LoraSpec

    for rank, alpha, rslora in [(4, 8, False), (16, 8, True), (8, None, True)]:
        spec = LoraSpec(rank=rank, alpha=alpha, use_rslora=rslora)
        assert spec.scaling == pytest.approx(lora_scale(spec.resolved_alpha, rank, rslora))


@pytest.mark.parametrize("change, message", [
    ({"lora_alpha": None}, "lora_alpha is None; expected a finite number"),
    ({"lora_alpha": "16"}, "lora_alpha is '16'; expected a finite number"),
    ({"r": 0}, "r is 0; expected a whole number of at least 1"),
    ({"r": None}, "r is None"),
    ({"use_rslora": "yes"}, "use_rslora is 'yes'; expected true or false"),
    ({"rank_pattern": {"v_proj": 2.5}}, "v_proj is 2.5"),
    ({"alpha_pattern": ["v_proj"]}, "alpha_pattern is ['v_proj']"),
    ({"peft_type": "IA3"}, "a IA3 adapter (peft_type); loraft reads LoRA adapters only"),
    ({"target_modules": 3}, "target_modules is 3"),
])
def test_a_malformed_key_names_the_file_and_the_key(change, message):
    raw = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **change}
    with pytest.raises(LoraftError) as caught:
        AdapterConfig.parse(raw, "/runs/a/adapter_config.json")
    assert str(caught.value).startswith("/runs/a/adapter_config.json: ") and message in str(caught.value)


def test_a_rank_that_disagrees_with_rank_pattern_is_refused_by_merge_and_inspect_alike(tiny_run, tmp_path, run_cli):
    folder = rslora_with_patterns(tiny_run, tmp_path / "run")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["rank_pattern"] = {}  # the v_proj tensors are rank 2, the config now says 4
    (folder / "adapter_config.json").write_text(json.dumps(config))
    answers = [run_cli("merge", "--adapter", folder, "--out", tmp_path / "m"), run_cli("inspect", folder)]
    for code, _, stderr in answers:
        assert code == 2 and "v_proj has rank 2" in stderr and "adapter_config.json says r = 4" in stderr
    assert answers[0][2] == answers[1][2]
