"""The dtype names configs may use, the one check that a config names valid ones, and the dtypes they name."""
import jax.numpy as jnp

from llmcxr_jax.errors import UsageError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def check_dtypes(cfg, names=("dtype", "param_dtype")) -> None:
    for name in names:
        if getattr(cfg, name) not in DTYPES:
            raise UsageError(f"{name} {getattr(cfg, name)!r} is not one of {sorted(DTYPES)}")


class DtypeNames:
    """A model config's `dtype` (compute) and `param_dtype` (weights) names as jnp dtypes."""

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]
