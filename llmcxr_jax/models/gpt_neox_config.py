"""The GPT-NeoX LM's configuration: GPTNeoXConfig (shapes, numerics, the attention kernel) and the
names it accepts for activations and remat policies. models/gpt_neox.py builds the modules from it.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax

from llmcxr_jax.configs import dataclass_from_dict
from llmcxr_jax.errors import UsageError
from llmcxr_jax.models import attention as attn
from llmcxr_jax.models.dtypes import DtypeNames, check_dtypes

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


# transformers' ACT2FN names -> the same function. "gelu" is exact (erf; Pythia, Dolly); the others
# are the tanh approximation 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), which transformers
# computes as NewGELUActivation, FastGELUActivation and torch's gelu(approximate="tanh").
ACTIVATIONS = {"gelu": partial(jax.nn.gelu, approximate=False), "gelu_new": partial(jax.nn.gelu, approximate=True),
               "gelu_fast": partial(jax.nn.gelu, approximate=True),
               "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True)}


@dataclasses.dataclass(frozen=True)
class GPTNeoXConfig(DtypeNames):
    """Shapes and numerics of the LM. Every field is explicit: configs/ supply the values."""

    vocab_size: int  # real rows, T + K; logits at ids >= vocab_size are -inf
    padded_vocab_size: int  # stored rows (VocabLayout.padded_size)
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    rotary_pct: float
    rotary_base: float
    max_position_embeddings: int
    layer_norm_eps: float
    use_parallel_residual: bool
    attention_bias: bool
    hidden_act: str
    initializer_range: float
    dtype: str
    param_dtype: str
    scan_layers: bool
    remat_policy: str
    # How self-attention is computed (same numbers): "auto" | "xla" | "splash" (TPU) | "cudnn" (NVIDIA GPU);
    # see models/attention.py. The defaults are what a checkpoint saved before these keys existed gets.
    attention: str = "auto"
    splash_block_q: int = attn.DEFAULT_SPLASH_BLOCK  # splash query tile (a multiple of 128; clipped to the length)
    splash_block_kv: int = attn.DEFAULT_SPLASH_BLOCK  # splash key/value tile
    attention_interpret: bool = False  # fused kernels in Pallas interpret mode: they run anywhere (slow; tests)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise UsageError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise UsageError(f"hidden_act {self.hidden_act!r} is not supported; choose one of {sorted(ACTIVATIONS)} "
                             "(GPT-NeoX/Pythia/Dolly use 'gelu')")
        if self.remat_policy not in REMAT_POLICIES:
            raise UsageError(f"remat_policy {self.remat_policy!r} is not one of {sorted(REMAT_POLICIES)}")
        check_dtypes(self)
        attn.check_kernel_settings(self.attention, self.splash_block_q, self.splash_block_kv)
        if self.padded_vocab_size < self.vocab_size:
            raise UsageError(f"padded_vocab_size {self.padded_vocab_size} < vocab_size {self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_ndims(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def attention_kernel(self) -> attn.KernelSettings:
        return attn.KernelSettings(self.attention, self.splash_block_q, self.splash_block_kv, self.attention_interpret)

    def replace(self, **kw) -> GPTNeoXConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, c, layout) -> GPTNeoXConfig:
        """From a configs/gpt_neox.py ConfigDict and the VocabLayout that sizes the table."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"vocab_size", "padded_vocab_size"}
        return cls(vocab_size=layout.size, padded_vocab_size=layout.padded_size, **{k: c[k] for k in fields})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTNeoXConfig:
        """From to_dict()'s output; a dict saved before the attention keys existed gets their defaults."""
        added = {f.name: f.default for f in dataclasses.fields(cls) if f.name in ATTENTION_KEYS}
        return dataclass_from_dict(cls, {**added, **d}, "model config")


# How a model computes attention, not what it learned: a training run takes them from its own config
# (train/state.py); added after the first checkpoints were written, so from_dict fills in their defaults.
ATTENTION_KEYS = ("attention", "splash_block_q", "splash_block_kv", "attention_interpret")
