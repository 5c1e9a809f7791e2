"""Dolly-style prompt text for the four LLM-CXR tasks and its token ids: the byte-exact template, our
own instruction paraphrases (a user's file replaces them through instructions.py), and prompt text to
training arrays (image tokens injected at "<image>", response-only or joint loss mask).
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import numpy as np

from llmcxr_jax.errors import UsageError
from llmcxr_jax.vocab import END_KEY, INSTRUCTION_KEY, RESPONSE_KEY, SpecialTokens, VocabLayout

INTRO_BLURB = ("Below is an instruction that describes a task. "
               "Write a response that appropriately completes the request.")
INPUT_KEY = "Input:"
# LLM-CXR writes an image as this text; its middle token ("image") is replaced by the image tokens.
IMAGE_MARKER = "<image>"
# Optional dedicated delimiters (image_delimiters="special"): not part of LLM-CXR, so a tokenizer
# only has them after add_image_delimiters(); adding them grows T by two.
IMAGE_BEGIN = "<|image|>"
IMAGE_END = "<|/image|>"

# Our own paraphrases (LLM-CXR samples one of ten per example; these are not its wording). The
# released model saw LLM-CXR's: `llmcxr extract-instructions` reads them from the user's clone.
REPORT_INSTRUCTIONS = (
    "Write the radiology report for this chest X-ray.",
    "Read the chest radiograph given as input and describe its findings in a free-text report.",
    "Act as a radiologist: interpret the chest X-ray below and write the findings and impression.",
    "Produce a free-text radiology report that describes the input chest X-ray image.",
    "Describe what this chest radiograph shows, in the style of a radiology report.",
    "Interpret the chest X-ray provided as input and report what you see.",
    "Given the chest X-ray image, compose the matching radiology report.",
    "Examine this chest radiograph and write a concise radiology report for it.",
    "Draft the free-text report a radiologist would write for the input chest X-ray.",
    "Summarize the findings of this chest X-ray image as a radiology report.",
)
IMAGE_INSTRUCTIONS = (
    "Create the chest X-ray image described by this radiology report.",
    "Draw a chest radiograph that matches the findings in the report below.",
    "Given the radiology report as input, generate a chest X-ray consistent with it.",
    "Synthesize a chest X-ray image whose appearance agrees with the following report.",
    "Render a chest radiograph that a radiologist would describe with this report.",
    "Produce a chest X-ray image showing the findings stated in the input report.",
    "Turn this free-text radiology report into a matching chest X-ray image.",
    "Generate a plausible chest radiograph for the patient described in the report.",
    "Make a chest X-ray image that fits the description in this radiology report.",
    "From the report given as input, generate the corresponding chest X-ray.",
)


def format_prompt(instruction: str, response: str, input_text: str | None = None) -> str:
    """The full training text; an empty or None input leaves the "Input:" block out (as Dolly does)."""
    return generation_prompt(instruction, input_text) + f"{response}\n\n{END_KEY}"


def generation_prompt(instruction: str, input_text: str | None = None) -> str:
    """The prompt a model completes: everything up to and including "### Response:\\n"."""
    head = f"{INTRO_BLURB}\n\n{INSTRUCTION_KEY}\n{instruction}\n\n"
    if input_text:
        head += f"{INPUT_KEY}\n{input_text}\n\n"
    return head + RESPONSE_KEY


def add_image_delimiters(tok) -> int:
    """Adds IMAGE_BEGIN / IMAGE_END as special tokens (for image_delimiters="special"); returns how many were new."""
    from tokenizers import AddedToken

    missing = [t for t in (IMAGE_BEGIN, IMAGE_END) if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return len(missing)


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """One example as token arrays of its own length n (no padding)."""

    input_ids: np.ndarray  # [n] int32
    targets: np.ndarray  # [n] int32: input shifted left, the last target is pad
    loss_mask: np.ndarray  # [n] float32, on target positions
    modality: np.ndarray  # [n] int8: 1 where the target is an image token


class PromptTokenizer:
    """Prompt text (+ image codes) -> token ids, the way LLM-CXR injects images and masks the loss.

    image_delimiters="text": the image sits between the "<" and ">" tokens of "<image>" (LLM-CXR).
    image_delimiters="special": the text "<image>" becomes IMAGE_BEGIN IMAGE_END and the image
    tokens go between them; both must already be in the tokenizer (add_image_delimiters).
    """

    def __init__(self, tok, layout: VocabLayout, special: SpecialTokens, image_delimiters: str = "text"):
        if tok.truncation is not None or tok.padding is not None:
            tok = copy.deepcopy(tok)  # a truncating tokenizer would silently cut responses
            tok.no_truncation()
            tok.no_padding()
        self.tok, self.layout, self.special = tok, layout, special
        size = tok.get_vocab_size(with_added_tokens=True)
        if size != layout.text_size:
            raise UsageError(f"tokenizer has {size} tokens but the VocabLayout says T = {layout.text_size}; "
                             "build the layout from this tokenizer")
        if image_delimiters == "text":
            ids = tok.encode(IMAGE_MARKER).ids
            if len(ids) != 3:
                raise UsageError(f"the tokenizer splits {IMAGE_MARKER!r} into {len(ids)} tokens; LLM-CXR's "
                                 "injection needs 3 ('<', 'image', '>'); use image_delimiters='special'")
            self._marker, self._keep = ids, 1  # keep "<", replace "image", keep ">"
        elif image_delimiters == "special":
            ids = [tok.token_to_id(t) for t in (IMAGE_BEGIN, IMAGE_END)]
            if None in ids:
                raise UsageError(f"tokenizer has no {IMAGE_BEGIN!r}/{IMAGE_END!r} tokens; add them with "
                                 "prompts.add_image_delimiters(tok) or use image_delimiters='text'")
            self._marker, self._keep = ids, 1  # keep begin, insert, keep end
        else:
            raise UsageError(f"image_delimiters must be 'text' or 'special', got {image_delimiters!r}")
        self.image_delimiters = image_delimiters

    def encode(self, text: str, image_codes: np.ndarray | None = None) -> np.ndarray:
        """Token ids [n] int32; with image_codes, the one "<image>" in text becomes the image tokens."""
        if image_codes is not None and self.image_delimiters == "special":
            text = text.replace(IMAGE_MARKER, IMAGE_BEGIN + IMAGE_END)
        ids = np.asarray(self.tok.encode(text).ids, np.int32)
        if image_codes is None:
            return ids
        where = _find_all(ids, self._marker)
        if len(where) != 1:
            found = "is not" if not where else f"occurs {len(where)} times"
            raise UsageError(f"image marker {IMAGE_MARKER!r} {found} in the tokenized prompt; an image "
                             f"prompt needs it exactly once: {text[:80]!r}...")
        cut = where[0] + self._keep
        drop = len(self._marker) - 2  # text mode drops "image"; special mode drops nothing
        image = self.layout.image_token(np.asarray(image_codes)).astype(np.int32)
        return np.concatenate([ids[:cut], image, ids[cut + drop:]])

    def example(self, ids: np.ndarray, loss: str = "response") -> TokenizedExample:
        """Targets, loss mask and modality for token ids of one full prompt.

        LLM-CXR (its completion-only collator) ignores every label up to and including the first
        "### Response:\\n" token and appends no EOS, so the last trained target is the final token
        of "### End". loss="joint" trains every next-token target (the ablation).
        """
        n = len(ids)
        targets = np.full(n, self.special.pad_id, np.int32)
        targets[:-1] = ids[1:]
        mask = np.zeros(n, np.float32)
        if loss == "response":
            hits = np.flatnonzero(ids == self.special.response_key_id)
            if not len(hits):
                raise UsageError(f"prompt has no {RESPONSE_KEY!r} token; response-only loss needs it")
            mask[hits[0]:n - 1] = 1.0
        elif loss == "joint":
            mask[:n - 1] = 1.0
        else:
            raise UsageError(f"loss must be 'response' or 'joint', got {loss!r}")
        modality = self.layout.is_image_token(targets).astype(np.int8)
        return TokenizedExample(ids.astype(np.int32), targets, mask, modality)


def _find_all(ids: np.ndarray, pattern: Sequence[int]) -> list[int]:
    """Start offsets of every occurrence of pattern in ids."""
    k = len(pattern)
    if len(ids) < k:
        return []
    starts = np.flatnonzero(ids[:len(ids) - k + 1] == pattern[0])
    return [int(s) for s in starts if np.array_equal(ids[s:s + k], pattern)]
