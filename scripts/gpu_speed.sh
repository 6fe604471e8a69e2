#!/bin/bash
# Issue 25 device runs on one H200 (`run` from /work/main with carry [.gpuwt, .whl, .whlx]; .gpuwt = this tree,
# .whl from ../shared/gpu/wheels.sh, .whlx = pydantic and its three dependencies, which the GPU image lacks):
#   cd .gpuwt && bash scripts/gpu_speed.sh tests throughput | real ...
# tests: the kernel and fused-LoRA tests on CUDA (-m gpu).
# throughput: the seed recipe (bf16 LoRA, QLoRA) and loraft in one run: `loraft train` with the shipped configs,
#   and loraft's in-process path on the recipe's very rows (loss curves comparable step by step).
# real: alpaca-like row lengths: the recipe and `loraft train configs/llama8b.yaml` (as shipped, packed,
#   padding-free) on the same texts; and full-length rows padding-free.
# Every result lands under $OUT as soon as its case ends.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../.whl/*.whl ../.whlx/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv"
python3 - > "$OUT/versions.json" <<'PY'
import importlib.metadata as md, json
print(json.dumps({n: md.version(n) for n in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "liger-kernel", "triton", "datasets", "pydantic")}))
PY
for step in "$@"; do
  case $step in
    tests)
      timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_lora_kernels.py tests/test_fused_lora.py 2>&1 | tail -15 | tee "$OUT/tests.log" ;;
    throughput)
      python3 scripts/bench_train.py all --steps 20 \
        --only anchor-lora,cli-llama8b,anchor-qlora,cli-llama8b-qlora,lora-auto,qlora-auto --out "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.log" ;;
    real)
      python3 scripts/bench_train.py all --steps 10 \
        --only anchor-real,cli-llama8b-real,cli-llama8b-real-packed,cli-llama8b-real-padfree,cli-llama8b-padfree --out "$OUT/real.json" 2>&1 | tee "$OUT/real.log" ;;
  esac
done
