"""The one place where vocabulary arithmetic lives: text ids, image-code ids, table padding.

Text tokens are ids 0..T-1 (T = len(tokenizer)); image code c is id T + c; the stored
embedding table and LM head have `padded_size` rows (a multiple of 128 and of the tensor axis).
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
from etils import epath

from llmcxr_jax import storage, user_files
from llmcxr_jax.errors import MissingInputError, UsageError

# Dolly / LLM-CXR prompt keys; their exact strings matter for checkpoint compatibility.
INSTRUCTION_KEY = "### Instruction:"
RESPONSE_KEY = "### Response:\n"
END_KEY = "### End"
DOLLY_SPECIAL_TOKENS = (END_KEY, INSTRUCTION_KEY, RESPONSE_KEY)

TABLE_MULTIPLE = 128


@dataclasses.dataclass(frozen=True)
class VocabLayout:
    """Where text and image tokens live in the LM's vocabulary."""

    text_size: int  # T = len(tokenizer)
    image_codes: int  # K = VQ-GAN codebook size
    padded_size: int  # rows stored in embed_in / embed_out

    @classmethod
    def create(cls, text_size: int, image_codes: int, tensor_parallelism: int = 1) -> VocabLayout:
        if text_size <= 0 or image_codes < 0:
            raise UsageError(f"vocabulary needs text_size > 0 and image_codes >= 0, got {text_size}, {image_codes}")
        multiple = math.lcm(TABLE_MULTIPLE, int(tensor_parallelism))
        padded = -(-(text_size + image_codes) // multiple) * multiple
        return cls(text_size=int(text_size), image_codes=int(image_codes), padded_size=int(padded))

    def __post_init__(self):
        if self.padded_size < self.size:
            raise UsageError(f"padded_size {self.padded_size} is smaller than T + K = {self.size}")

    @property
    def size(self) -> int:
        """T + K: the rows a HF export carries (padding sliced off)."""
        return self.text_size + self.image_codes

    @property
    def image_token_range(self) -> tuple[int, int]:
        """[first, last) ids of image tokens."""
        return self.text_size, self.size

    def image_token(self, codes):
        """VQ-GAN code(s) -> token id(s); a code outside [0, K) is an error."""
        arr = np.asarray(codes)
        if arr.size and (arr.min() < 0 or arr.max() >= self.image_codes):
            bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
            raise UsageError(f"image code {bad} is outside the codebook [0, {self.image_codes})")
        out = arr.astype(np.int64) + self.text_size
        return int(out) if np.ndim(codes) == 0 else out

    def image_code(self, token_ids):
        """Token id(s) -> VQ-GAN code(s); a non-image id is an error."""
        arr = np.asarray(token_ids)
        if arr.size and not np.all(self.is_image_token(arr)):
            bad = arr[~self.is_image_token(arr)].ravel()[0]
            raise UsageError(f"token id {int(bad)} is not an image token "
                             f"(image ids are {self.text_size}..{self.size - 1})")
        out = arr.astype(np.int64) - self.text_size
        return int(out) if np.ndim(token_ids) == 0 else out

    def is_image_token(self, token_ids):
        """Works on numpy and jax arrays alike."""
        return (token_ids >= self.text_size) & (token_ids < self.size)

    def valid_row_mask(self) -> np.ndarray:
        """[padded_size] bool: True for real rows, False for the padding that must never win."""
        return np.arange(self.padded_size) < self.size

    def check_tensor_parallelism(self, tensor: int) -> None:
        if self.padded_size % tensor:
            raise UsageError(
                f"vocabulary table of {self.padded_size} rows does not split over tensor axis {tensor}; "
                f"use a tensor size dividing {self.padded_size}")

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VocabLayout:
        return cls(text_size=int(d["text_size"]), image_codes=int(d["image_codes"]), padded_size=int(d["padded_size"]))


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokens that prompts and decoding rely on."""

    eos_id: int
    pad_id: int
    end_key_id: int
    instruction_key_id: int
    response_key_id: int

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpecialTokens:
        return cls(**{f.name: int(d[f.name]) for f in dataclasses.fields(cls)})


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def has_tokenizer(directory: str) -> bool:
    return storage.path(directory).joinpath("tokenizer.json").is_file()


def load_tokenizer(directory: str):
    """A HF tokenizer directory -> (tokenizers.Tokenizer with the Dolly keys, SpecialTokens, config).

    Adds "### End", "### Instruction:", "### Response:\\n" when missing and uses eos as pad
    when the directory names no pad token, as LLM-CXR does.
    """
    from tokenizers import AddedToken

    folder = storage.path(directory)  # local or gs://
    if not (folder / "tokenizer.json").is_file():
        raise MissingInputError(f"{directory} has no tokenizer.json; give a HF fast-tokenizer directory")
    tok = _tokenizer_from_file(folder / "tokenizer.json")
    cfg = _read_json(folder / "tokenizer_config.json")
    smap = _read_json(folder / "special_tokens_map.json")
    missing = [t for t in DOLLY_SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    eos = _token_content(cfg.get("eos_token") or smap.get("eos_token"))
    if eos is None or tok.token_to_id(eos) is None:
        raise UsageError(f"tokenizer in {directory} names no eos_token that exists in its vocabulary")
    pad = _token_content(cfg.get("pad_token") or smap.get("pad_token")) or eos
    if tok.token_to_id(pad) is None:
        pad = eos
    special = SpecialTokens(
        eos_id=tok.token_to_id(eos), pad_id=tok.token_to_id(pad), end_key_id=tok.token_to_id(END_KEY),
        instruction_key_id=tok.token_to_id(INSTRUCTION_KEY), response_key_id=tok.token_to_id(RESPONSE_KEY))
    cfg = dict(cfg)
    cfg["eos_token"], cfg["pad_token"] = eos, pad
    return tok, special, cfg


def _tokenizer_from_file(path: epath.Path):
    """tokenizer.json -> tokenizers.Tokenizer; a file that is not JSON or lacks its model (a BPE one its vocab
    and merges) is a UsageError naming it."""
    from tokenizers import Tokenizer

    text = user_files.decode_utf8(path.read_bytes(), path, "tokenizer")
    data = user_files.parse_json(text, path, "tokenizer")
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise UsageError(f"tokenizer {path} has no model section; give the tokenizer.json a HF fast tokenizer saves")
    if model.get("type") == "BPE" and not (isinstance(model.get("vocab"), dict) and
                                           isinstance(model.get("merges"), list)):
        raise UsageError(f"tokenizer {path} has a BPE model without its vocab and merges; give a whole tokenizer.json")
    try:
        return Tokenizer.from_str(text)
    except Exception as e:
        if type(e) is not Exception:  # tokenizers reports a malformed file as a bare Exception; others are defects
            raise
        raise UsageError(f"tokenizer {path} does not load: {e}") from None


def text_size(tok) -> int:
    """len(tokenizer) as HF counts it: base vocabulary plus added tokens."""
    return tok.get_vocab_size(with_added_tokens=True)


# The tokenizer class an export names: transformers 4.28 (LLM-CXR's pin) through 5.x load tokenizer.json
# as it is under this name. A source's own class may exist in one of them only ("TokenizersBackend" is 5.x's,
# 4.28 has no slow "GPTNeoXTokenizer" and 5.x's rebuilds its pipeline from vocab and merges).
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
# tokenizer_config.json keys that describe the saving library, not the tokenizer; a reader rebuilds them.
_SAVER_KEYS = ("added_tokens_decoder", "tokenizer_file", "tokenizer_class", "backend")


def portable_tokenizer_json(tok) -> str:
    """tokenizer.json that tokenizers 0.13 onwards reads: BPE merges as "a b" strings.

    tokenizers >= 0.20 writes each merge as an ["a", "b"] pair, which 0.13 (LLM-CXR's pin) refuses with
    "data did not match any variant of untagged enum ModelWrapper". The string form is split at its one
    space, so it is lossless unless a merge part holds a space (byte-level BPE maps the space to "Ġ", so
    never there); such a tokenizer keeps the pairs, since strings would read back as other merges.
    """
    data = json.loads(tok.to_str())
    model = data.get("model") or {}
    merges = model.get("merges")
    if model.get("type") == "BPE" and merges and all(isinstance(m, list) for m in merges) and \
            not any(" " in part for m in merges for part in m):
        model["merges"] = [" ".join(m) for m in merges]
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def save_tokenizer(tok, config: dict[str, Any], directory: str) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json, loadable by tokenizers 0.13
    onwards and transformers 4.28 through 5.x."""
    folder = storage.path(directory)  # local or gs://
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(portable_tokenizer_json(tok), encoding="utf-8")
    cfg = {k: v for k, v in config.items() if k not in _SAVER_KEYS}
    cfg["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    extra = [t for t in cfg.get("additional_special_tokens", []) if _token_content(t) not in DOLLY_SPECIAL_TOKENS]
    cfg["additional_special_tokens"] = list(DOLLY_SPECIAL_TOKENS) + extra
    _write_json(folder / "tokenizer_config.json", cfg)
    smap = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if cfg.get(k) is not None}
    smap["additional_special_tokens"] = cfg["additional_special_tokens"]
    _write_json(folder / "special_tokens_map.json", smap)


def _token_content(t) -> str | None:
    if isinstance(t, dict):
        return t.get("content")
    return t


def _read_json(path: epath.Path) -> dict[str, Any]:
    return user_files.read_json_object(path, "tokenizer file") if path.is_file() else {}


def _write_json(path: epath.Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
