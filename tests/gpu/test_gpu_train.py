"""GPU end to end (skipped without CUDA): bf16 LoRA and 4-bit QLoRA train a tiny model and learn."""

import pytest

from lora_ft.config_io import validate_dict
from lora_ft.train import train

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("quantized", [False, True], ids=["bf16-lora", "qlora-nf4"])
def test_gpu_training_learns_and_records_peak_memory(tiny_config, quantized):
    tiny_config["training"]["precision"] = "bf16"
    if quantized:
        tiny_config["model"]["quantization"] = {"bits": 4, "quant_type": "nf4"}
    result = train(validate_dict(tiny_config))
    assert result.manifest.metrics.peak_gpu_memory_gib > 0
    assert result.scores["adapter"]["loss"] < result.scores["base"]["loss"]
    quantization = result.manifest.base_model.quantization
    assert (quantization.model_dump() if quantization else None) == (tiny_config["model"].get("quantization") and {
        "bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"})


def test_a_qlora_run_is_scored_by_eval_on_its_4bit_base_as_the_train_summary_was(tiny_config):
    """Issue 21 (c) on the GPU: train's held-out loss and p(stop) are eval's on the same rows. The train summary
    scores the adapter on the 4-bit base it trained on; eval loads that base the same way by default, and
    --full-precision-base (the base merge and serve compute on) is a different, named measurement."""
    from lora_ft.evaluate import EvalSettings, evaluate

    tiny_config["training"]["precision"] = "bf16"
    tiny_config["model"]["quantization"] = {"bits": 4, "quant_type": "nf4"}
    result = train(validate_dict(tiny_config))
    held = {who: score.loss for who, score in result.manifest.metrics.heldout.items()}
    stop = result.manifest.stop_tokens["after_training"]
    report = evaluate(result.run_dir, regression=[], settings=EvalSettings(max_new_tokens=2), progress=False)
    metrics = report.task["metrics"]
    assert report.settings["base_weights"] == "4-bit nf4, as trained"
    for who in ("base", "adapter"):
        assert metrics["loss"][who] == pytest.approx(held[who], rel=2e-3)
        assert metrics["stop_probability"][who] == pytest.approx(stop[who]["mean_probability"], rel=2e-3, abs=1e-3)
    full = evaluate(result.run_dir, regression=[], settings=EvalSettings(max_new_tokens=2), progress=False,
                    full_precision_base=True)
    assert full.settings["base_weights"] == "full precision"
    print("qlora parity:", {who: (held[who], metrics["loss"][who], full.task["metrics"]["loss"][who])
                            for who in ("base", "adapter")})
