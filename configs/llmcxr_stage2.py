"""LLM-CXR stage 2: PA/AP images of each patient's earliest study, report text = impression only,
same task mix and optimizer as stage 1, 9k steps, initialised from stage 1
(`--config.train.init_from=STAGE1_WORKDIR`). Variants as stage 1.
"""
from llmcxr_jax.configs import load_sibling

VARIANTS = ("tiny", "3b", "7b", "12b")


def get_config(variant=None):
    return load_sibling(__file__, "llmcxr_stage1.py", variant, stage=2)
