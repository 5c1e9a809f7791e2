"""Response ids -> text as LLM-CXR's outputs were written: the tokenizers library's decode, then the
space clean-up that transformers 4.28 (the original's version) applied by default on decode, then strip.
"""
from __future__ import annotations

from collections.abc import Sequence

# transformers' PreTrainedTokenizerBase.clean_up_tokenization, in its order: each pair is one
# str.replace over the whole text, so an earlier rule can change what a later one sees.
CLEAN_UP_RULES = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                  (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def clean_up_tokenization(text: str) -> str:
    """Drop the space a word-piece decode leaves before . ? ! , and English contractions."""
    for before, after in CLEAN_UP_RULES:
        text = text.replace(before, after)
    return text


def decode_response(tokenizer, ids: Sequence[int], clean_up_spaces: bool = True,
                    keep_special_tokens: bool = False) -> str:
    """Ids of one response (stop id excluded) -> its text; special tokens are left out unless
    keep_special_tokens (LLM-CXR's decode kept them). The clean-up runs before strip, as
    transformers' decode did before the original's .strip()."""
    text = tokenizer.decode([int(i) for i in ids], skip_special_tokens=not keep_special_tokens)
    return (clean_up_tokenization(text) if clean_up_spaces else text).strip()
