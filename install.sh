#!/usr/bin/env bash
# Install llmcxr-jax and its test dependencies into the active virtualenv (CPU).
# torch comes first from the machine's CPU wheel so nothing pulls a CUDA build; taming's
# modules (parity tests only) install without their torchvision/lightning requirements.
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
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -c requirements-lock.txt -e ".[test]"
python -m pip install --quiet --no-deps -c requirements-lock.txt taming-transformers-rom1504==0.0.6
# torchxrayvision's DenseNet code (CIP parity test); its torchvision import is stood in for by the test
python -m pip install --quiet --no-deps -c requirements-lock.txt torchxrayvision==1.5.7
