"""A random tiny LM checkpoint (with tokenizer and special ids) and VQ-GAN config for the tests of
generation and evaluation."""
from llmcxr_jax import checkpoint, sharding, vocab
from llmcxr_jax.models.gpt_neox import GPTNeoXConfig, init_model
from llmcxr_jax.models.vqgan import VQGANConfig

# 32 px, 3 downsamplings: a 4 x 4 latent = 16 codes, K = 64
VQ = VQGANConfig(resolution=32, in_channels=3, out_channels=3, ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1,
                 attn_resolutions=(), z_channels=32, embed_dim=32, n_embed=64, beta=0.25, dropout=0.0,
                 legacy_loss=True, dtype="float32", param_dtype="float32")


def tiny_lm_config(layout: vocab.VocabLayout) -> GPTNeoXConfig:
    """A 2-layer, 32-wide float32 GPT-NeoX for `layout`'s vocabulary."""
    return GPTNeoXConfig(vocab_size=layout.size, padded_vocab_size=layout.padded_size, hidden_size=32, num_layers=2,
                         num_heads=4, intermediate_size=64, rotary_pct=0.25, rotary_base=10000.0,
                         max_position_embeddings=512, layer_norm_eps=1e-5, use_parallel_residual=True,
                         attention_bias=True, hidden_act="gelu", initializer_range=0.02, dtype="float32",
                         param_dtype="float32", scan_layers=False, remat_policy="none")


def tiny_lm(directory: str, tok_dir: str, image_codes: int, step: int = 0) -> str:
    tok, special, tok_cfg = vocab.load_tokenizer(tok_dir)
    layout = vocab.VocabLayout.create(vocab.text_size(tok), image_codes)
    cfg = tiny_lm_config(layout)
    meta = checkpoint.lm_metadata(cfg, layout, special, sharding.make_mesh("1,-1,1"), None)
    checkpoint.save_params(directory, init_model(cfg, 0), meta, tokenizer=tok, tokenizer_config=tok_cfg, step=step)
    return directory
