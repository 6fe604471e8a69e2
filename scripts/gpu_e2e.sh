#!/bin/bash
# End-to-end `loraft train` on the GPU: bf16 LoRA and 4-bit QLoRA on a Llama-3.1-8B-shaped random model,
# with the shipped configs and the quickstart data. Writes each run's manifest and a summary under $OUT.
# Device command: source scripts/gpu_env.sh && bash scripts/gpu_e2e.sh   (carry: .whl .whlx)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 scripts/make_random_model.py llama8b /tmp/llama8b
common=(--set model.name=/tmp/llama8b --set data.train=recipes/data/quickstart_train.jsonl
        --set data.eval=recipes/data/quickstart_eval.jsonl --set data.eval_fraction=0
        --set training.max_steps=30 --set training.eval_steps=15 --set training.save_steps=15 --set training.logging_steps=5)
for name in ${E2E_RUNS:-llama8b llama8b-qlora}; do
  SECONDS=0
  python3 -m lora_ft train configs/$name.yaml "${common[@]}" --set output_dir=/tmp/runs/$name 2>&1 | tee "$OUT/$name.log"
  code=${PIPESTATUS[0]}
  cp /tmp/runs/$name/manifest.json "$OUT/$name.manifest.json" 2>/dev/null
  echo "{\"config\": \"configs/$name.yaml\", \"exit_code\": $code, \"wall_s\": $SECONDS}" > "$OUT/$name.status.json"
done
# Issue 21 (c): eval scores the QLoRA run on its 4-bit base as the train summary did; --full-precision-base is
# the base merge and serve compute on. Both reports land in $OUT beside the manifest's figures.
for how in as-trained full-precision; do
  flag=(); [ "$how" = full-precision ] && flag=(--full-precision-base)
  python3 -m lora_ft eval --adapter /tmp/runs/llama8b-qlora --no-regression --max-new-tokens 8 "${flag[@]}" \
    --out /tmp/eval-$how 2>&1 | tee "$OUT/llama8b-qlora.eval-$how.log"
  cp /tmp/eval-$how/report.json "$OUT/llama8b-qlora.eval-$how.json" 2>/dev/null
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv"
