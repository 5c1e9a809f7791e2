"""Tiny HF artefacts the tests build themselves: a byte-level BPE tokenizer and GPT-NeoX models."""
import os

import numpy as np

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "FINDINGS: The lungs are clear. No pleural effusion or pneumothorax. Heart size is normal.",
    "IMPRESSION: No acute cardiopulmonary process. Mild cardiomegaly. Possible left lower lobe consolidation.",
    "Generate a chest X-ray image that corresponds to the report. What abnormality is seen in the image?",
]


def make_tokenizer_dir(path: str, vocab_size: int = 300) -> str:
    """A GPT-NeoX-like byte-level BPE tokenizer saved as a HF directory (no Dolly keys yet)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.save_pretrained(path)
    return path


def make_hf_model(path: str, vocab_size: int, *, parallel: bool = True, rotary_pct: float = 0.25, seed: int = 0,
                  hidden: int = 64, layers: int = 2, heads: int = 4, tokenizer_dir: str | None = None,
                  legacy_config: bool = False, safe: bool = True, hidden_act: str = "gelu", rotary_base: float = 10000):
    """A random GPT-NeoX (all weights randomised, biases and norms too) saved as a HF directory."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, rotary_pct=rotary_pct, rotary_emb_base=rotary_base,
                        use_parallel_residual=parallel, max_position_embeddings=128, eos_token_id=0, bos_token_id=0,
                        hidden_act=hidden_act)
    cfg._attn_implementation = "eager"
    model = GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    model.save_pretrained(path)
    if not safe:  # the legacy pytorch_model.bin that dolly-v2-3b ships, with its embed_out key
        os.remove(os.path.join(path, "model.safetensors"))
        state = {k.replace("lm_head.", "embed_out."): v for k, v in model.state_dict().items()}
        torch.save(state, os.path.join(path, "pytorch_model.bin"))
    if legacy_config:  # rewrite config.json the way transformers 4.x (and dolly-v2-3b) store it
        import json
        with open(os.path.join(path, "config.json")) as f:
            c = json.load(f)
        rope = c.pop("rope_parameters")
        c["rotary_pct"], c["rotary_emb_base"] = rope["partial_rotary_factor"], rope["rope_theta"]
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(c, f)
    if tokenizer_dir is not None:
        import shutil
        for name in os.listdir(tokenizer_dir):
            shutil.copy(os.path.join(tokenizer_dir, name), path)
    return model


def load_hf(path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype="float32").eval()
    return model


def left_padded_batch(rng: np.random.Generator, vocab: int, lengths, total: int):
    """ids [b, total] with each row left-padded to total; mask 1 on real tokens; HF-style positions."""
    ids = np.zeros((len(lengths), total), np.int64)
    mask = np.zeros((len(lengths), total), np.int64)
    for i, n in enumerate(lengths):
        ids[i, total - n:] = rng.integers(2, vocab, n)
        mask[i, total - n:] = 1
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    return ids, mask, positions
