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
