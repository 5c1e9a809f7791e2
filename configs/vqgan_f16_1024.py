"""VQ-GAN configs. get_config("f16_1024"): LLM-CXR's image tokenizer (taming ImageNet f16/1024
architecture, 256 px, 16x16 = 256 codes). get_config("tiny"): the same shape family at 64 px for
tests and the demo.
"""
import ml_collections

VARIANTS = ("f16_1024", "tiny")


def get_config(variant=None):
    variant = variant or "f16_1024"
    if variant not in VARIANTS:
        raise ValueError(f"unknown VQ-GAN variant {variant!r}; choose one of {VARIANTS}")
    c = ml_collections.ConfigDict()
    c.name = variant
    m = c.model = ml_collections.ConfigDict()
    if variant == "f16_1024":
        m.resolution, m.ch, m.num_res_blocks = 256, 128, 2
        m.attn_resolutions = (16,)
        m.z_channels = m.embed_dim = 256
        m.n_embed = 1024
    else:
        m.resolution, m.ch, m.num_res_blocks = 64, 32, 1
        m.attn_resolutions = (4,)
        m.z_channels = m.embed_dim = 32
        m.n_embed = 64
    m.ch_mult = (1, 1, 2, 2, 4)
    m.in_channels = 3  # grayscale CXRs as RGB, as LLM-CXR; 1 is the efficient choice
    m.out_channels = 3
    m.beta = 0.25
    m.dropout = 0.0
    m.legacy_loss = True
    m.dtype = "float32"
    m.param_dtype = "float32"
    return c
