#!/usr/bin/env bash
# Install llmcxr-jax and its test dependencies into the active virtualenv, pinned by
# requirements-lock.txt (CPU). torch comes first, alone, so nothing pulls a CUDA build: the lock's
# version from the configured pip sources, or from the wheel index in TORCH_INDEX_URL when given, e.g.
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash install.sh
# (pip's --index-url: that index alone serves torch and its dependencies; the next step re-pins
# those to the lock). taming's modules (parity tests only) install without their
# torchvision/lightning requirements.
set -euo pipefail
cd "$(dirname "$0")"
# Java runs pycocoevalcap's PTB tokenizer (BLEU / ROUGE-L / CIDEr-D tokens in `llmcxr evaluate`).
if ! command -v java >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends default-jre-headless >/dev/null
  else
    echo "install.sh: no java on PATH; install a Java runtime (e.g. apt-get install default-jre-headless)" \
         "or run evaluate with --text-tokenizer simple" >&2
  fi
fi
# Debian's chromium drives the web demo's browser test (tests/test_serve_browser.py, through playwright).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
  else
    echo "install.sh: no chromium on PATH; the browser test will skip (apt-get install chromium chromium-driver)" >&2
  fi
fi
torch_pin=$(grep -E '^torch==' requirements-lock.txt) || {
  echo "install.sh: requirements-lock.txt pins no torch (a line torch==VERSION)" >&2; exit 1; }
python -m pip install --quiet -c requirements-lock.txt --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  python -m pip install --quiet --index-url "$TORCH_INDEX_URL" "$torch_pin"
else
  python -m pip install --quiet -c requirements-lock.txt "$torch_pin"
fi
python -m pip install --quiet -c requirements-lock.txt -e ".[test]"
python -m pip install --quiet --no-deps -c requirements-lock.txt taming-transformers-rom1504==0.0.6
# torchxrayvision's DenseNet code (CIP parity test); its torchvision import is stood in for by the test
python -m pip install --quiet --no-deps -c requirements-lock.txt torchxrayvision==1.5.7
# torch-fidelity's FID Inception (Inception FID parity test): it requires torchvision, which does not
# install beside this torch; the test loads its feature_extractor_inceptionv3.py by path
python -m pip install --quiet --no-deps -c requirements-lock.txt torch-fidelity==0.4.0
