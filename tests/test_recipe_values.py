"""The paper's training recipe in the shipped stage configs (3b and its _original twin), against the numbers
read from shared/REFERENCE.md's "Training recipe" section: a change on either side is caught.

REFERENCE.md says "global batch 16 (2 per GPU x 8 A100-40GB)", counted in examples. The _original variants
train on unpacked rows of one example (data.packing False), so their 16 rows are 16 examples; the plain 3b
variant packs up to data.max_examples_per_row examples into each of its 16 rows of 2048 tokens."""
import os
import re

import numpy as np
import pytest
from lm_run_helpers import STAGE1, STAGE2

from llmcxr_jax import configs
from llmcxr_jax.train import optim

REFERENCE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "REFERENCE.md")
_NUM = r"(\d+(?:\.\d+)?(?:e-?\d+)?)"


def _k(text: str) -> int:
    """"76k" -> 76000."""
    return int(float(text[:-1]) * 1000) if text.endswith("k") else int(text)


@pytest.fixture(scope="module")
def recipe():
    if not os.path.isfile(REFERENCE):
        pytest.fail(f"{REFERENCE} is missing: the recipe values are checked against it")
    text = open(REFERENCE).read()
    section = re.search(r"^## Training recipe\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "REFERENCE.md has no '## Training recipe' section"
    s = " ".join(section.group(1).split())

    def find(pattern):
        m = re.search(pattern, s)
        assert m, f"REFERENCE.md's Training recipe no longer says {pattern!r}: {s}"
        return m.group(1)

    return {"optimizer": find(r"^(\w+),"), "lr": float(find(rf"\blr {_NUM}")),
            "warmup": int(find(r"warmup (\d+) steps")), "batch": int(find(r"global batch (\d+)")),
            "per_gpu": int(find(r"\((\d+) per GPU")), "gpus": int(find(r"per GPU x (\d+)")),
            "dtype": find(r"\b(bf16|fp16|fp32)\b"),
            "steps": {1: _k(find(r"Stage 1: (\d+k?) steps")), 2: _k(find(r"[Ss]tage 2: (\d+k?) steps"))}}


def test_reference_section_parses(recipe):
    # the parse itself: 16 = 2 per GPU x 8 GPUs is REFERENCE.md's own arithmetic
    assert recipe["batch"] == recipe["per_gpu"] * recipe["gpus"]
    assert recipe["steps"][1] > recipe["steps"][2] > 0


@pytest.mark.parametrize("stage,spec", [(1, STAGE1), (2, STAGE2)])
@pytest.mark.parametrize("variant", ["3b", "3b_original"])
def test_stage_configs_follow_the_paper_recipe(recipe, stage, spec, variant):
    c = configs.load_config(f"{spec}:{variant}")
    t = c.train
    assert c.data.stage == stage
    assert t.learning_rate == recipe["lr"]
    assert t.warmup_steps == recipe["warmup"]
    assert t.batch_size == recipe["batch"] and t.grad_accum >= 1
    assert t.steps == recipe["steps"][stage]
    assert {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[recipe["dtype"]] == c.model.dtype
    if variant.endswith("_original"):  # one example per row: the batch counts examples as the paper's does
        assert c.data.packing is False
    # the schedule those keys build: linear warmup from 0 to lr over the warmup steps, then constant
    lr = optim.learning_rate(t)
    np.testing.assert_allclose([float(lr(0)), float(lr(recipe["warmup"] // 2)), float(lr(recipe["warmup"])),
                                float(lr(t.steps))], [0.0, recipe["lr"] / 2, recipe["lr"], recipe["lr"]], rtol=1e-6)


def test_optimizer_is_adamw(recipe):
    """AdamW = Adam plus decoupled weight decay: with zero gradients an Adam step does not move a parameter,
    AdamW moves it by -lr * weight_decay * p (optimizer built from the 3b config with decay switched on)."""
    assert recipe["optimizer"] == "AdamW"
    t = configs.load_config(f"{STAGE1}:3b").train
    t.weight_decay, t.grad_clip, t.warmup_steps = 0.1, 0.0, 0
    w = np.full((2, 3), 2.0, np.float32)  # an MLP kernel: a matrix that HF Trainer's AdamW decays
    params = {"mlp": {"dense_h_to_4h": {"kernel": w}}}
    tx = optim.make_optimizer(t, params)
    zeros = {"mlp": {"dense_h_to_4h": {"kernel": np.zeros_like(w)}}}
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["mlp"]["dense_h_to_4h"]["kernel"], -recipe["lr"] * 0.1 * w, rtol=1e-6)
