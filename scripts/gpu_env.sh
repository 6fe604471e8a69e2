# Source at the start of every device run: installs the carried wheels (.whl from ../shared/gpu/wheels.sh,
# .whlx for CLI libraries the GPU image may lack) and puts the repo on PYTHONPATH.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
missing=()
for pair in typer:typer rich:rich pydantic:pydantic yaml:pyyaml gguf:gguf xxhash:xxhash click:click shellingham:shellingham; do
  python3 -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ] && [ -d .whlx ]; then
  echo "installing from .whlx: ${missing[*]}"
  for name in "${missing[@]}"; do
    case $name in
      pydantic) set -- .whlx/pydantic-*.whl .whlx/pydantic_core-*.whl .whlx/annotated_types-*.whl .whlx/typing_inspection-*.whl ;;
      rich) set -- .whlx/rich-*.whl .whlx/markdown_it_py-*.whl .whlx/mdurl-*.whl ;;
      *) set -- .whlx/${name//-/_}-*.whl ;;
    esac
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$@"
  done
fi
python3 - <<'PY'
import importlib.metadata as md
print({n: md.version(n) for n in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "pydantic", "typer")})
PY
