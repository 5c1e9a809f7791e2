"""A tiny LM checkpoint whose next-token distribution is fixed whatever the context, for the tests of
report->CXR retries, the text clean-up and the decoding departures: its text is the space "Ġ" and "."
(so decoded text has spaces before full stops), image ids and eos come with chosen total probabilities,
and the end key never."""
import jax.numpy as jnp
import numpy as np
from generator_helpers import tiny_lm_config

from llmcxr_jax import checkpoint, sharding, vocab
from llmcxr_jax.models.gpt_neox import init_model


def fixed_distribution(model, probs: np.ndarray):
    """Final norm output pinned to e_0 and row 0 of the LM head = log probs: every position's logits."""
    logits = np.log(np.maximum(probs, 1e-30)).astype(np.float32)
    ln, head = model.final_layer_norm, model.embed_out["kernel"]
    ln.scale.set_value(jnp.zeros_like(ln.scale.get_value()))
    ln.bias.set_value(jnp.zeros_like(ln.bias.get_value()).at[0].set(1.0))
    head.set_value(jnp.zeros_like(head.get_value()).at[0, :len(logits)].set(jnp.asarray(logits)))
    return model


def fixed_lm(directory: str, tok_dir: str, image_codes: int = 64, image_prob: float = 16 / 60,
             eos_prob: float = 0.0) -> str:
    """Each response token: an image id with probability image_prob (uniform over the codes), eos with
    eos_prob, else "Ġ" or "." (half each). With the retry default of h*w + 44 = 60 new tokens for 16
    codes, a response holds Binomial(60, image_prob) image ids: exactly 16 with probability 0.115 at 16/60."""
    tok, special, tok_cfg = vocab.load_tokenizer(tok_dir)
    layout = vocab.VocabLayout.create(vocab.text_size(tok), image_codes)
    cfg = tiny_lm_config(layout)
    probs = np.zeros(layout.size)
    probs[[tok.token_to_id("Ġ"), tok.token_to_id(".")]] = (1 - image_prob - eos_prob) / 2
    probs[special.eos_id] += eos_prob
    probs[layout.text_size:] = image_prob / image_codes
    meta = checkpoint.lm_metadata(cfg, layout, special, sharding.make_mesh("1,-1,1"), None)
    model = fixed_distribution(init_model(cfg, 0), probs)
    checkpoint.save_params(directory, model, meta, tokenizer=tok, tokenizer_config=tok_cfg)
    return directory
