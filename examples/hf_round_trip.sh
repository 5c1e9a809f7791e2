#!/usr/bin/env bash
# HF GPT-NeoX -> llmcxr (with K image-token rows) -> HF, on a tiny random model built here.
# Until `llmcxr demo` lands this is the newest finished end-to-end path.
set -euo pipefail
WORK=${1:-runs/hf_round_trip}
rm -rf "$WORK"
python examples/make_tiny_hf.py --out "$WORK/hf"
llmcxr import-hf --hf "$WORK/hf" --out "$WORK/ckpt" --image-codes 1024 --dtype float32
llmcxr export-hf --ckpt "$WORK/ckpt" --out "$WORK/export" --dtype float32
python examples/check_export.py --ckpt "$WORK/ckpt" --hf "$WORK/export"
