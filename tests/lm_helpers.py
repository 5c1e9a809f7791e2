"""A tiny GPT-NeoX-like tokenizer and a tiny CXR/VQA/Dolly corpus for the prompt and LM-batch tests."""
import numpy as np

from llmcxr_jax import vocab
from llmcxr_jax.data import prompts

K = 37  # image codebook size of the tiny corpus
CODES = 16  # codes per image (a 4x4 latent)
REPORTS = [
    "The lungs are clear. No pleural effusion or pneumothorax.",
    "Heart size is normal. Mild cardiomegaly.",
    "Possible left lower lobe consolidation. Small left effusion.",
    "No acute cardiopulmonary process.",
]


def make_tokenizer(directory: str):
    """Byte-level BPE trained on our prompt pieces; "<image>" -> "<", "image", ">" as in GPT-NeoX."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [prompts.INTRO_BLURB, *prompts.REPORT_INSTRUCTIONS, *prompts.IMAGE_INSTRUCTIONS, *REPORTS,
              "Input:\n<image>\n\n### Response:\n", "Is there a pleural effusion? yes. Where? right lower lobe."]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 10, trainer)
    vocab.save_tokenizer(tok, {"eos_token": "<|endoftext|>"}, directory)
    return vocab.load_tokenizer(directory)  # adds the Dolly keys, pad = eos


def make_corpus(n_images: int = 12, n_vqa: int = 8, n_text: int = 6, seed: int = 0):
    """(image_text, vqa, text, codes) plain inputs; every dicom id has valid codes."""
    from llmcxr_jax.data.lm_batches import ImageTextExample, TextExample

    rng = np.random.default_rng(seed)
    ids = [f"d{i:03d}" for i in range(n_images)]
    codes = {d: rng.integers(0, K, CODES).astype(np.uint16) for d in ids}
    image_text = [ImageTextExample(d, REPORTS[i % len(REPORTS)]) for i, d in enumerate(ids)]
    vqa = [{"dicom_id": ids[i % n_images], "question": f"Is there a pleural effusion? ({i})",
            "answer": "yes" if i % 2 else "no", "question_type": "presence"}
           for i in range(n_vqa)]
    text = [TextExample(f"Where is lesion {i}?", "" if i % 2 else f"context {i}", f"right lower lobe {i}")
            for i in range(n_text)]
    return image_text, vqa, text, codes
