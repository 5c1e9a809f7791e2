"""GPT-NeoX shapes LLM-CXR builds on. get_config("tiny" | "dolly-v2-3b" | "pythia-6.9b" | "pythia-12b").

`text_size` is len(tokenizer) with the Dolly keys (LLM-CXR: 50281); `vocab_rows` is the HF table
size of the base checkpoint; `image_codes` is the VQ-GAN codebook (1024).
"""
import ml_collections

SHAPES = {
    # name: (hidden, layers, heads, intermediate, HF table rows, len(tokenizer) with Dolly keys)
    "tiny": (64, 2, 4, 256, 512, 509),
    "dolly-v2-3b": (2560, 32, 32, 10240, 50280, 50281),
    "pythia-6.9b": (4096, 32, 32, 16384, 50432, 50281),
    "pythia-12b": (5120, 36, 40, 20480, 50688, 50281),
}


VARIANTS = tuple(SHAPES)


def get_config(variant=None):
    variant = variant or "tiny"
    if variant not in SHAPES:
        raise ValueError(f"unknown GPT-NeoX variant {variant!r}; choose one of {sorted(SHAPES)}")
    hidden, layers, heads, mlp, rows, text = SHAPES[variant]
    c = ml_collections.ConfigDict()
    c.name = variant
    c.text_size = text
    c.vocab_rows = rows
    c.image_codes = 1024 if variant != "tiny" else 64
    c.hidden_size = hidden
    c.num_layers = layers
    c.num_heads = heads
    c.intermediate_size = mlp
    c.rotary_pct = 0.25
    c.rotary_base = 10000.0
    c.max_position_embeddings = 2048
    c.layer_norm_eps = 1e-5
    c.use_parallel_residual = True
    c.attention_bias = True
    c.hidden_act = "gelu"  # exact (Pythia, Dolly); also gelu_new, gelu_fast, gelu_pytorch_tanh (tanh approximation)
    c.initializer_range = 0.02
    c.dtype = "bfloat16"
    c.param_dtype = "float32"
    c.scan_layers = variant != "tiny"
    c.remat_policy = "none" if variant == "tiny" else "dots_no_batch"
    # Self-attention kernel, same numbers either way: "auto" (splash on TPU, cudnn on NVIDIA GPUs, xla on CPU),
    # "xla", "splash" (TPU Pallas kernel) or "cudnn" (cuDNN flash attention; Pallas flash for packed/padded rows).
    c.attention = "auto"
    c.splash_block_q = 512  # splash tiles: multiples of 128, clipped to the sequence length
    c.splash_block_kv = 512
    c.attention_interpret = False  # fused kernels in Pallas interpret mode, so they run on any platform (slow; tests)
    return c
