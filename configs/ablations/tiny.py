"""CI sweep: three short runs of the tiny stage-1 LM (baseline, joint loss, no packing).

Point it at data with --set: `python launch/sweep.py run configs/ablations/tiny.py --workdir ROOT
--set data.root=CORPUS --set data.codes=CODES --set data.tokenizer=TOK`.
"""
from llmcxr_jax.configs import sweep_run_config


def get_sweep():
    return {
        "base": "configs/llmcxr_stage1.py:tiny",
        "command": "train",
        "common": ["--config.train.steps=20", "--config.train.log_every=1", "--config.train.eval_every=10",
                   "--config.train.checkpoint_every=10"],
        "runs": {
            "baseline": [],
            "joint_loss": ["--config.data.loss=joint"],
            "no_packing": ["--config.data.packing=false"],
        },
    }


VARIANTS = tuple(get_sweep()["runs"])


def get_config(run=None):
    """One run's config, so `llmcxr train --config configs/ablations/tiny.py:RUN` trains it alone."""
    return sweep_run_config(__file__, get_sweep(), run)
