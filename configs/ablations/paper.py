"""LLM-CXR's ablations (REFERENCE.md): without VQA data, without stage 1, a joint (prompt +
response) loss instead of response-only, and a VQ-GAN without the CIP loss, each beside its
baseline. Stage-2 runs start from the stage-1 run of the same sweep ("{root}/NAME").

Give the local inputs with --set (each applies to the runs whose config has the key; a
`train:` or `train-vqgan:` prefix limits one to that command's runs):
  --set train:train.init_from=DOLLY_V2_3B_HF --set data.root=MIMIC --set data.codes=CODES   (LM runs)
  --set train-vqgan:train.init_from=IMAGENET_F16_1024_CKPT --set train.data=MIMIC
  --set train.lpips_weights=F --set train.cip_weights=F                                     (VQ-GAN runs)
Stage-2 runs set their own train.init_from, which a --set never undoes. data.mixture weights of 0
are allowed (tasks are sampled by weight / sum); no_vqa writes the renormalised mix anyway.
"""
from llmcxr_jax.configs import sweep_run_config

STAGE1, STAGE2 = "configs/llmcxr_stage1.py:3b", "configs/llmcxr_stage2.py:3b"
VQGAN = "configs/vqgan_f16_1024.py:f16_1024"
NO_VQA = ["--config.data.mixture.cxr_to_report=0.375", "--config.data.mixture.report_to_cxr=0.375",
          "--config.data.mixture.vqa=0.0", "--config.data.mixture.text=0.25"]
JOINT = ["--config.data.loss=joint"]


def _stage2(after: str, overrides=()):
    return {"base": STAGE2, "overrides": [f"--config.train.init_from={{root}}/{after}", *overrides]}


def get_sweep():
    return {
        "base": STAGE1,
        "command": "train",
        "common": [],
        "runs": {
            "baseline": [],
            "baseline_stage2": _stage2("baseline"),
            "no_vqa": NO_VQA,
            "no_vqa_stage2": _stage2("no_vqa", NO_VQA),
            "joint_loss": JOINT,
            "joint_loss_stage2": _stage2("joint_loss", JOINT),
            # stage 2 straight from the base model: train.init_from is the --set HF directory
            "no_stage1": {"base": STAGE2, "overrides": []},
            "vqgan": {"base": VQGAN, "command": "train-vqgan", "overrides": []},
            "no_cip": {"base": VQGAN, "command": "train-vqgan", "overrides": ["--config.train.cip_weight=0"]},
        },
    }


VARIANTS = tuple(get_sweep()["runs"])


def get_config(run=None):
    """One run's config, so `llmcxr train --config configs/ablations/paper.py:RUN` trains it alone."""
    return sweep_run_config(__file__, get_sweep(), run)
