"""Engineering ablations on the 3b stage-1 LM, short runs that compare speed (tokens/s, MFU) and
early loss: sequence packing, rematerialisation policy, device-mesh shape and the init of the
new image-token rows (normal vs mean of the text rows; it acts only with train.init_from = a HF
directory, given by --set). The baseline is the stage-1 default: packing, dots_no_batch remat,
an FSDP mesh over every chip ("1,-1,1"), normal rows.
"""
from llmcxr_jax.configs import sweep_run_config


def get_sweep():
    return {
        "base": "configs/llmcxr_stage1.py:3b",
        "command": "train",
        "common": ["--config.train.steps=300", "--config.train.log_every=10", "--config.train.eval_every=150",
                   "--config.train.checkpoint_every=300"],
        "runs": {
            "baseline": [],
            "no_packing": ["--config.data.packing=false"],
            "remat_none": ["--config.model.remat_policy=none"],
            "remat_dots": ["--config.model.remat_policy=dots"],
            "remat_full": ["--config.model.remat_policy=full"],
            "mesh_data_parallel": ["--config.train.mesh=-1,1,1"],
            "mesh_fsdp_tensor2": ["--config.train.mesh=1,-1,2"],
            "new_rows_mean": ["--config.train.new_rows=mean"],
        },
    }


VARIANTS = tuple(get_sweep()["runs"])


def get_config(run=None):
    """One run's config, so `llmcxr train --config configs/ablations/engineering.py:RUN` trains it alone."""
    return sweep_run_config(__file__, get_sweep(), run)
