#!/usr/bin/env bash
# The accelerator check (benchmarks/accelerator_check.py) from the repo root, on a machine with one NVIDIA GPU:
#   bash benchmarks/accelerator_check.sh [--out DIR] [--only PART,...] [--budget-scale X]   # ~8 min on an H100
#   bash benchmarks/accelerator_check.sh --smoke --out DIR      # tiny shapes on the CPU (the test suite runs this)
# Results: DIR/accelerator_check.json, .md and .log (DIR defaults to $OUT, else the current folder).
#
# Python: $PYTHON if set, else the active virtualenv's python, else python3 (a GPU image's own, with CUDA jax,
# torch and transformers). No install step runs and nothing is downloaded: the repo is put on PYTHONPATH, and
# wheels found in .whl/ are unpacked into /tmp/llmcxr_site first, for what such an image lacks. Make them here,
# on a machine with pip and network, then carry .whl/ to the GPU machine with the checkout:
#   bash benchmarks/accelerator_check.sh --fetch-wheels     # ml_collections, grain, array_record, portpicker,
#                                                             # diffusers at the versions of requirements-lock.txt
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ]; then py=python
else py=python3
fi

if [ "${1:-}" = "--fetch-wheels" ]; then
  pins=()
  for name in ml_collections grain array_record portpicker diffusers; do
    pin=$(grep -iE "^${name//_/[-_]}==" requirements-lock.txt) || {
      echo "accelerator_check.sh: requirements-lock.txt pins no $name" >&2; exit 1; }
    pins+=("$pin")
  done
  mkdir -p .whl
  if [ -d .git/info ] && ! grep -qxF '/.whl/' .git/info/exclude 2>/dev/null; then
    echo '/.whl/' >> .git/info/exclude  # local only: the wheels are carried, not committed
  fi
  "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
  ls -l .whl
  exit 0
fi

if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/llmcxr_site .whl/*.whl
  export PYTHONPATH="/tmp/llmcxr_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$py" benchmarks/accelerator_check.py "$@"
