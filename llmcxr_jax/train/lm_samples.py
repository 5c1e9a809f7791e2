"""What the LM trainer shows of the held-out data in TensorBoard at eval steps: each example of the first held-out
row, its reference response and the model's teacher-forced prediction of it (at every response position, the
argmax next token given the reference tokens before it: what the held-out loss scores, not free generation,
which `llmcxr generate` does). Image spans show as their length and how many codes were predicted exactly."""
from __future__ import annotations

import numpy as np

from llmcxr_jax.train import tensorboard
from llmcxr_jax.vocab import VocabLayout

# the batch fields of one packed row that the table needs (packing.BATCH_SPEC), beside "predictions"
ROW_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids")


def _runs(flags: np.ndarray):
    """(start, end, flag) of each run of equal flags."""
    start = 0
    for end in range(1, len(flags) + 1):
        if end == len(flags) or flags[end] != flags[start]:
            yield start, end, bool(flags[start])
            start = end


def _decode(tokenizer, layout: VocabLayout, ids: np.ndarray, reference: np.ndarray | None = None) -> str:
    """Text tokens decoded, each run of image tokens as "[N image tokens]". With `reference` (ids are predictions
    of it), runs follow the reference's image spans: "[N image tokens, K as the reference]"; an image token
    predicted where the reference has text shows as "[image token]"."""
    image = np.asarray(layout.is_image_token(ids if reference is None else reference))
    parts = []
    for start, end, is_image in _runs(image):
        if is_image:
            span = f"{end - start} image tokens"
            if reference is not None:
                span += f", {int(np.sum(ids[start:end] == reference[start:end]))} as the reference"
            parts.append(f"[{span}]")
            continue
        text = ids[start:end]
        for s, e, wrong in _runs(np.asarray(layout.is_image_token(text))):
            parts.append("[image token]" * (e - s) if wrong else
                         tokenizer.decode([int(i) for i in text[s:e]], skip_special_tokens=False))
    return "".join(parts)


def markdown(row: dict[str, np.ndarray], tokenizer, layout: VocabLayout) -> str:
    """row: ROW_KEYS and "predictions" ([length] each) of one packed held-out row -> a table, one line per example
    with a response: its prompt, reference response, teacher-forced prediction and the share of response tokens
    predicted exactly."""
    lines = []
    for segment in np.unique(row["segment_ids"][row["segment_ids"] > 0]):
        at = row["segment_ids"] == segment
        response = row["loss_mask"][at] > 0
        if not response.any():
            continue
        first = int(np.argmax(response))  # its input token is the prompt's last; its target, the response's first
        prompt = row["input_ids"][at][: first + 1]
        reference, predicted = row["targets"][at][response], row["predictions"][at][response]
        right = float(np.mean(predicted == reference))
        lines.append((_decode(tokenizer, layout, prompt), _decode(tokenizer, layout, reference),
                      _decode(tokenizer, layout, predicted, reference), f"{right:.1%}"))
    header = ("prompt", "reference response", "teacher-forced prediction", "tokens right")
    return tensorboard.markdown_table(header, lines)
