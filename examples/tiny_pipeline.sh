#!/usr/bin/env bash
# The LLM-CXR pipeline at toy size on a CPU: synthetic CXR corpus -> tiny VQ-GAN -> image codes
# -> tokenizer -> tiny GPT-NeoX stage 1 -> HF export. Rerunning resumes or skips finished steps.
set -euo pipefail
OUT=${1:-runs/tiny_pipeline}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
[ -f "$OUT/corpus/synthetic.json" ] || llmcxr synth --out "$OUT/corpus" --num-images 300 --image-size 64 --seed 0
llmcxr train-vqgan --config configs/vqgan_f16_1024.py:tiny --workdir "$OUT/vqgan" \
  --config.train.data="$OUT/corpus" --config.train.steps=100 --config.train.eval_every=50 \
  --config.train.checkpoint_every=50
llmcxr encode-images --vqgan "$OUT/vqgan/vqgan" --data "$OUT/corpus" --out "$OUT/codes" --batch-size 32
[ -f "$OUT/tokenizer/tokenizer.json" ] || python examples/train_tokenizer.py --data "$OUT/corpus" --out "$OUT/tokenizer" --vocab-size 2048
llmcxr train --config configs/llmcxr_stage1.py:tiny --workdir "$OUT/stage1" \
  --config.data.root="$OUT/corpus" --config.data.codes="$OUT/codes" --config.data.tokenizer="$OUT/tokenizer" \
  --config.data.dolly_eval_rows=50 --config.train.steps=60
[ -f "$OUT/hf/config.json" ] || llmcxr export-hf --ckpt "$OUT/stage1/checkpoints" --out "$OUT/hf"
