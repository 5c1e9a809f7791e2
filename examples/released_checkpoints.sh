#!/usr/bin/env bash
# What a holder of LLM-CXR's two released archives runs, shown on a tiny stand-in that
# examples/released_layout.py writes with the release's directory names, file names and formats.
# With the real files: REPO is your clone of the original code with the archives unpacked into
# REPO/ckpts/ (its README's layout), K is 1024, and IMAGES / REPORTS are your own inputs.
set -euo pipefail
WORK=${1:-runs/released_checkpoints}
rm -rf "$WORK"
python examples/released_layout.py "$WORK"
REPO=$WORK/llm-cxr
LLM=$REPO/ckpts/llmcxr_mimic-cxr-256-txvloss-medvqa-stage1_2
VQ=$REPO/ckpts/vqgan_mimic-cxr-256-txvloss/2023-09-05T13-56-50_mimic-cxr-256-txvloss
K=64  # the VQ-GAN's codebook size: the stand-in's; the release's is 1024 (import-hf's default)
set -x
llmcxr import-hf --hf "$LLM" --out "$WORK/lm" --image-codes "$K"
llmcxr import-vqgan --taming "$VQ-4e-compat.ckpt" --taming-config "$VQ-project-compat.yaml" --out "$WORK/vqgan"
llmcxr extract-instructions --original-repo "$REPO" --out "$WORK/instructions"
llmcxr generate --ckpt "$WORK/lm" --vqgan "$WORK/vqgan" --task report --inputs "$WORK/images" \
  --instructions "$WORK/instructions" --out "$WORK/reports"
llmcxr generate --ckpt "$WORK/lm" --vqgan "$WORK/vqgan" --task image --inputs "$WORK/reports.txt" \
  --instructions "$WORK/instructions" --out "$WORK/images_drawn"
llmcxr export-hf --ckpt "$WORK/lm" --out "$WORK/export"
python examples/check_export.py --ckpt "$WORK/lm" --hf "$WORK/export"  # transformers reloads the export
