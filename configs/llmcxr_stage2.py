"""LLM-CXR stage 2: PA/AP images of each patient's earliest study, report text = impression only,
same task mix and optimizer as stage 1, 9k steps, initialised from stage 1
(`--config.train.init_from=STAGE1_WORKDIR`). Variants as stage 1, "_original" ones included
(LLM-CXR's data recipe: e.g. 3b_original).
"""
from llmcxr_jax.configs import load_sibling

VARIANTS = ("tiny", "3b", "7b", "12b", "tiny_original", "3b_original", "7b_original", "12b_original")


def get_config(variant=None):
    return load_sibling(__file__, "llmcxr_stage1.py", variant, stage=2)
