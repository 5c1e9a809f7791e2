"""LLM-CXR's four tasks end to end: CXR -> report, report -> CXR, CXR + question -> answer, and
plain instructions, with the Dolly generation prompt, the VQ-GAN on both sides and the sampler
(report->CXR constrained to h*w codes, or LLM-CXR's sample-and-retry). Batches are left padded.
Every result keeps the ids behind it (prompt, sampled response, image codes) for other runtimes to compare.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llmcxr_jax import checkpoint, sharding
from llmcxr_jax.data import images as image_io
from llmcxr_jax.data import prompts
from llmcxr_jax.data.instructions import check_instruction
from llmcxr_jax.errors import UsageError
from llmcxr_jax.infer import generate as gen
from llmcxr_jax.infer.detokenize import decode_response
from llmcxr_jax.infer.sampling import LLMCXR_TEMPERATURE, LLMCXR_TOP_K, LLMCXR_TOP_P, SamplingConfig

TASKS = ("report", "image", "vqa", "text")
REPORT_TOKENS, IMAGE_EXTRA_TOKENS, TEXT_TOKENS = 128, 3, 256  # LLM-CXR: 128 for reports
# report->CXR: "constrained" forces "<", h*w image ids, ">", "### End"; "retry" samples freely and
# retries until the response holds h*w image ids (LLM-CXR's generate_eval.py, which never gives up).
IMAGE_DECODINGS = ("constrained", "retry")
# Retries before an input counts as failed: a model that gets h*w codes right one time in five
# still fails only 1% of inputs (0.8 ** 21), and a hopeless input costs 21 tries, not forever.
MAX_RETRIES = 20
RETRY_SLACK_TOKENS = 44  # LLM-CXR samples 300 new tokens for 256 codes: the span plus 44
LM_DTYPES = ("float32", "bfloat16")  # compute dtype of generation; LLM-CXR generated in bfloat16
# With no instruction given, every input gets our first paraphrase of its task.
DEFAULT_INSTRUCTION = {"report": prompts.REPORT_INSTRUCTIONS[0], "image": prompts.IMAGE_INSTRUCTIONS[0]}
Instructions = str | Sequence[str] | None  # one for every input, one per input, or None: DEFAULT_INSTRUCTION
# An input CXR: a file path, the file's bytes, a PIL image, or a [H, W] / [H, W, 1 or 3] uint8 or uint16 array.
ImageInput = image_io.ImageInput


def per_input(instruction: Instructions, count: int, task: str) -> list[str]:
    """The instruction of each of `count` inputs of task "report" or "image"."""
    if instruction is None:
        return [DEFAULT_INSTRUCTION[task]] * count
    if isinstance(instruction, str):
        return [check_instruction(instruction, f"the {task} instruction")] * count
    given = list(instruction)
    if len(given) != count:
        raise UsageError(f"{len(given)} {task} instructions for {count} inputs; give one per input (or one string)")
    return [check_instruction(s, f"{task} instruction {i}") for i, s in enumerate(given)]


def check_decoding(image_decoding: str = "constrained", max_retries: int = MAX_RETRIES,
                   dtype: str = "float32") -> None:
    """Fail in one line on decoding options the generator would refuse, before a model loads."""
    if image_decoding not in IMAGE_DECODINGS:
        raise UsageError(f"image decoding {image_decoding!r} is not one of {', '.join(IMAGE_DECODINGS)}")
    if max_retries < 0:
        raise UsageError(f"max_retries must be >= 0 (0: one try, no retry), got {max_retries}")
    if dtype not in LM_DTYPES:
        raise UsageError(f"dtype {dtype!r} is not one of {', '.join(LM_DTYPES)}")


class TextResults(NamedTuple):
    """What a text task (report, vqa, text) made of n inputs, and the ids behind it."""

    texts: list[str]  # each response decoded (decode_response of generated_ids less a final stop id)
    prompt_ids: list[list[int]]  # each prompt as fed to the LM, image ids (T + code) in place of "<image>"
    generated_ids: list[list[int]]  # each response as sampled, up to and including its stop id (if emitted)
    image_codes: list[list[int]] | None  # report, vqa: each input image's h*w codes; text: None

    def ids(self, i: int) -> dict:
        """Input i's id fields of results.jsonl (and of evaluate's reports.jsonl, vqa.jsonl)."""
        codes = None if self.image_codes is None else self.image_codes[i]
        return {"prompt_ids": self.prompt_ids[i], "generated_ids": self.generated_ids[i], "image_codes": codes}


class Drawings(NamedTuple):
    """What report->CXR made of n reports. An input whose every try missed h*w codes (retry
    decoding only) has ok False, codes -1 and a NaN image."""

    images: np.ndarray  # [n, H, W, C] in [-1, 1]
    codes: np.ndarray  # [n, h*w]
    retries: np.ndarray  # [n] tries after the first; always 0 when constrained
    ok: np.ndarray  # [n] bool
    found: np.ndarray  # [n] image ids in the response kept (h*w), or in a failed input's last try
    prompt_ids: list[list[int]]  # each report's prompt as fed to the LM
    generated_ids: list[list[int]]  # the try kept (a failed input: its last), up to and including "### End"

    def failure(self, i: int) -> str:
        """Why input i has no image (empty when it has one)."""
        if self.ok[i]:
            return ""
        tries = int(self.retries[i]) + 1
        return (f"no response held exactly {self.codes.shape[1]} image tokens in {tries} "
                f"{'tries' if tries > 1 else 'try'} (the last held {self.found[i]})")

    def ids(self, i: int) -> dict:
        """Input i's id fields of results.jsonl (and of evaluate's images.jsonl); a failed input has
        image_codes None and the ids of its last try."""
        codes = [int(c) for c in self.codes[i]] if self.ok[i] else None
        return {"prompt_ids": self.prompt_ids[i], "generated_ids": self.generated_ids[i], "image_codes": codes}


@dataclasses.dataclass
class Generator:
    """A trained LM and its VQ-GAN, checked to share one codebook; its task methods take a batch of
    inputs and a SamplingConfig. One input at a time, with LLM-CXR's sampling by default:
    api.Generator (`from llmcxr_jax import Generator`), which wraps this one."""

    lm: checkpoint.LoadedLM
    vqgan: object
    encoder: prompts.PromptTokenizer
    open_id: int
    close_id: int
    clean_up_spaces: bool = True  # transformers' clean_up_tokenization on text responses, as LLM-CXR's
    # Our two departures from LLM-CXR's text decoding, each True to decode as the original did:
    allow_image_tokens_in_text: bool = False  # text responses may sample image ids (the decode drops them)
    stop_at_end_key_only: bool = False  # eos does not end a response; only "### End" does
    keep_special_tokens: bool = False  # special tokens inside a response stay in its text (LLM-CXR's decode)
    # 0: each batch left padded to its longest prompt; N: every prompt to N tokens, so one compiled
    # decoder per task serves prompts of any length (api.Generator, `llmcxr serve`)
    prompt_width: int = 0
    _encode: object = dataclasses.field(default=None, repr=False)
    _decode: object = dataclasses.field(default=None, repr=False)

    def __post_init__(self):  # jitted once per Generator: a new lambda per call would recompile each batch
        self._encode = jax.jit(lambda x: self.vqgan.encode(x)[0])
        self._decode = jax.jit(self.vqgan.decode)

    @classmethod
    def load(cls, ckpt: str, vqgan_dir: str, mesh_spec: str = "1,-1,1", dtype: str = "float32",
             clean_up_spaces: bool = True, allow_image_tokens_in_text: bool = False,
             stop_at_end_key_only: bool = False, keep_special_tokens: bool = False) -> Generator:
        """dtype: the LM's compute dtype; its parameters stay in the dtype they were saved in."""
        check_decoding(dtype=dtype)
        mesh = sharding.make_mesh(mesh_spec)
        lm = checkpoint.load_lm(ckpt, mesh, dtype=dtype)
        if lm.layout.image_codes == 0:
            raise UsageError(f"{ckpt} has no image-token rows (K = 0); import it with --image-codes K or train it")
        if lm.tokenizer is None or lm.special is None:
            raise UsageError(f"{ckpt} holds no tokenizer/ and special-token ids; use a checkpoint written by "
                             "import-hf or train")
        vqgan, _ = checkpoint.load_vqgan(vqgan_dir, sharding.make_mesh("-1,1,1"))
        if vqgan.cfg.n_embed != lm.layout.image_codes:
            raise UsageError(f"the VQ-GAN has {vqgan.cfg.n_embed} codes but the LM has {lm.layout.image_codes} "
                             "image rows; use the VQ-GAN its training codes came from")
        encoder = prompts.PromptTokenizer(lm.tokenizer, lm.layout, lm.special)
        open_id, _, close_id = (int(i) for i in lm.tokenizer.encode(prompts.IMAGE_MARKER).ids)
        return cls(lm, vqgan, encoder, open_id, close_id, clean_up_spaces, allow_image_tokens_in_text,
                   stop_at_end_key_only, keep_special_tokens)

    @property
    def codes_per_image(self) -> int:
        return self.vqgan.cfg.latent_size ** 2

    # ---- pieces
    def encode_images(self, paths: Sequence[ImageInput]) -> np.ndarray:
        """Image files (or bytes, PIL images, arrays: image_pixels) -> codes [n, h*w]; an unreadable
        file is a one-line error naming it."""
        cfg = self.vqgan.cfg
        pixels = np.stack([image_io.image_pixels(p, cfg.resolution, cfg.in_channels) for p in paths])
        return np.asarray(self._encode(jnp.asarray(pixels)))

    def decode_codes(self, codes: np.ndarray) -> np.ndarray:
        return np.asarray(self._decode(jnp.asarray(codes, jnp.int32)))

    def _batch(self, prompts_ids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        longest = max(len(p) for p in prompts_ids)
        if self.prompt_width and longest > self.prompt_width:
            raise UsageError(f"the prompt is {longest} tokens; this model takes at most {self.prompt_width} "
                             "(shorten the report or question)")
        width = self.prompt_width or longest
        ids = np.full((len(prompts_ids), width), self.lm.special.pad_id, np.int32)
        mask = np.zeros((len(prompts_ids), width), bool)
        for r, p in enumerate(prompts_ids):
            ids[r, width - len(p):], mask[r, width - len(p):] = p, True
        return ids, mask

    @property
    def text_mode(self) -> str:
        """The decoding mode of text responses: image ids masked ("text"), or not, as LLM-CXR sampled."""
        return "unconstrained" if self.allow_image_tokens_in_text else "text"

    def _run(self, prompt_ids, mode: str, sampling: SamplingConfig, seed: int):
        ids, mask = self._batch(prompt_ids)
        return gen.generate(self.lm.model, ids, mask, layout=self.lm.layout, special=self.lm.special, mode=mode,
                            rng=jax.random.key(seed), sampling=sampling, image_tokens=self.codes_per_image,
                            open_id=self.open_id, close_id=self.close_id, stop_at_eos=not self.stop_at_end_key_only)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids that end a text response: "### End" and eos, or "### End" alone (stop_at_end_key_only)."""
        return gen.stop_ids(self.lm.special, not self.stop_at_end_key_only)

    @staticmethod
    def generated(out) -> list[list[int]]:
        """Each row's ids as sampled: up to and including its stop id, or all it emitted without one."""
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        return [[int(t) for t in tokens[r, :lengths[r]]] for r in range(len(tokens))]

    def response_of(self, generated: Sequence[int]) -> list[int]:
        """One row's generated ids up to (not including) its first stop id."""
        row = list(generated)
        return row[:next((i for i, t in enumerate(row) if t in self.stop_ids), len(row))]

    def responses(self, out) -> list[list[int]]:
        """Each row's generated ids up to (not including) its first stop id."""
        return [self.response_of(row) for row in self.generated(out)]

    def decode(self, generated: Sequence[int]) -> str:
        """One row's generated ids as text (decode_response of its response: special tokens and ids
        beyond the tokenizer, i.e. image ids, left out, spaces cleaned up)."""
        return decode_response(self.lm.tokenizer, self.response_of(generated), self.clean_up_spaces,
                               self.keep_special_tokens)

    def texts(self, out) -> list[str]:
        """Each row's response as text (decode_response: special tokens left out, spaces cleaned up)."""
        return [self.decode(row) for row in self.generated(out)]

    def _text_results(self, prompt_ids: list[np.ndarray], sampling: SamplingConfig, seed: int,
                      codes: np.ndarray | None) -> TextResults:
        generated = self.generated(self._run(prompt_ids, self.text_mode, sampling, seed))
        return TextResults([self.decode(row) for row in generated], [[int(t) for t in p] for p in prompt_ids],
                           generated, None if codes is None else [[int(c) for c in row] for row in codes])

    # ---- tasks
    def report_prompts(self, image_paths: Sequence[ImageInput], instruction: Instructions = None) -> list[np.ndarray]:
        """The token ids of the CXR->report prompt of each image (its codes in place of "<image>")."""
        return self._image_input_prompts(per_input(instruction, len(image_paths), "report"),
                                         self.encode_images(image_paths))

    def _image_input_prompts(self, instructions: Sequence[str], codes: np.ndarray) -> list[np.ndarray]:
        return [self.encoder.encode(prompts.generation_prompt(i, prompts.IMAGE_MARKER), c)
                for i, c in zip(instructions, codes)]

    def image_prompts(self, reports: Sequence[str], instruction: Instructions = None) -> list[np.ndarray]:
        """The token ids of the report->CXR prompt of each report (the report as the prompt's input)."""
        if any(not r.strip() for r in reports):
            raise UsageError("a report is empty; give the findings / impression text to draw")
        ins = per_input(instruction, len(reports), "image")
        return [self.encoder.encode(prompts.generation_prompt(i, r)) for i, r in zip(ins, reports)]

    def greedy_responses(self, prompt_ids: Sequence[np.ndarray], max_new_tokens: int) -> list[list[int]]:
        """Argmax text responses as token ids (stop id excluded), for comparison with other runtimes; image
        ids are masked unless allow_image_tokens_in_text."""
        greedy = SamplingConfig.greedy_decoding(max_new_tokens)
        return self.responses(self._run(list(prompt_ids), self.text_mode, greedy, 0))

    def report_results(self, image_paths: Sequence[ImageInput], sampling: SamplingConfig, seed: int = 0,
                       instruction: Instructions = None) -> TextResults:
        """CXR -> report, with the prompt, response and input-image ids (each image encoded once)."""
        return self.report_from_codes(self.encode_images(image_paths), sampling, seed, instruction)

    def report_from_codes(self, codes: np.ndarray, sampling: SamplingConfig, seed: int = 0,
                          instruction: Instructions = None) -> TextResults:
        """CXR -> report from images already encoded ([n, h*w] codes, e.g. a code shard's)."""
        ins = per_input(instruction, len(codes), "report")
        return self._text_results(self._image_input_prompts(ins, codes), sampling, seed, codes)

    def report(self, image_paths: Sequence[str], sampling: SamplingConfig, seed: int = 0,
               instruction: Instructions = None) -> list[str]:
        return self.report_results(image_paths, sampling, seed, instruction).texts

    def answer_results(self, image_paths: Sequence[ImageInput], questions: Sequence[str], sampling: SamplingConfig,
                       seed: int = 0) -> TextResults:
        """CXR + question -> answer, with the prompt, response and input-image ids."""
        if len(image_paths) != len(questions) or any(not q.strip() for q in questions):
            raise UsageError("vqa needs one non-empty question per image")
        codes = self.encode_images(image_paths)
        return self._text_results(self._image_input_prompts(questions, codes), sampling, seed, codes)

    def answer(self, image_paths: Sequence[str], questions: Sequence[str], sampling: SamplingConfig,
               seed: int = 0) -> list[str]:
        return self.answer_results(image_paths, questions, sampling, seed).texts

    def text_results(self, instructions: Sequence[str], sampling: SamplingConfig, seed: int = 0) -> TextResults:
        """Plain instruction -> response, with the prompt and response ids (image_codes None)."""
        if any(not i.strip() for i in instructions):
            raise UsageError("an instruction is empty; give the text to respond to")
        ids = [self.encoder.encode(prompts.generation_prompt(i)) for i in instructions]
        return self._text_results(ids, sampling, seed, None)

    def text(self, instructions: Sequence[str], sampling: SamplingConfig, seed: int = 0) -> list[str]:
        return self.text_results(instructions, sampling, seed).texts

    def image(self, reports: Sequence[str], sampling: SamplingConfig, seed: int = 0,
              instruction: Instructions = None, decoding: str = "constrained",
              max_retries: int = MAX_RETRIES) -> Drawings:
        """Reports -> Drawings. "constrained": every input gets exactly h*w codes in one try. "retry":
        unconstrained sampling, each input retried until its response holds h*w image ids, at most
        max_retries times (gen.generate_image_unconstrained)."""
        check_decoding(decoding, max_retries)
        prompt_ids = self.image_prompts(reports, instruction)
        n = self.codes_per_image
        prompt_lists = [[int(t) for t in p] for p in prompt_ids]
        if decoding == "constrained":
            out = self._run(prompt_ids, "image", sampling, seed)
            codes = self.lm.layout.image_code(np.asarray(out.tokens)[:, 1:1 + n])
            zeros = np.zeros(len(codes), np.int64)
            return Drawings(self.decode_codes(codes), codes, zeros, np.ones(len(codes), bool), zeros + n,
                            prompt_lists, self.generated(out))
        ids, mask = self._batch(prompt_ids)
        got = gen.generate_image_unconstrained(self.lm.model, ids, mask, layout=self.lm.layout,
                                               special=self.lm.special, rng=jax.random.key(seed), sampling=sampling,
                                               image_tokens=n, max_retries=max_retries)
        images = np.full((len(ids), *self._image_shape), np.nan, np.float32)
        if got.ok.any():
            images[got.ok] = self.decode_codes(got.codes[got.ok])
        return Drawings(images, got.codes, got.retries, got.ok, got.found, prompt_lists, got.responses)

    @property
    def _image_shape(self) -> tuple[int, int, int]:
        cfg = self.vqgan.cfg
        return cfg.resolution, cfg.resolution, cfg.out_channels


def check_sampling(greedy: bool, temperature: float = LLMCXR_TEMPERATURE, top_p: float = LLMCXR_TOP_P,
                   top_k: int = LLMCXR_TOP_K) -> None:
    """Fail in one line on settings the sampler would refuse, before a model loads."""
    SamplingConfig(max_new_tokens=1, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)


def default_sampling(task: str, greedy: bool, max_new_tokens: int | None, codes_per_image: int,
                     temperature: float = LLMCXR_TEMPERATURE, top_p: float = LLMCXR_TOP_P,
                     top_k: int = LLMCXR_TOP_K, image_decoding: str = "constrained") -> SamplingConfig:
    """LLM-CXR's settings by default (temperature 1, top_p 0.92, top_k 0; 128 tokens for reports;
    for images the span, or with retry decoding h*w + 44: LLM-CXR's 300 for 256 codes);
    temperature / top_p / top_k override them when sampling."""
    if max_new_tokens is None:
        slack = RETRY_SLACK_TOKENS if image_decoding == "retry" else IMAGE_EXTRA_TOKENS
        max_new_tokens = codes_per_image + slack if task == "image" else \
            REPORT_TOKENS if task in ("report", "vqa") else TEXT_TOKENS
    if greedy:
        return SamplingConfig.greedy_decoding(max_new_tokens)
    return SamplingConfig(max_new_tokens=max_new_tokens, greedy=False, temperature=temperature, top_k=top_k,
                          top_p=top_p)


def run_task(g: Generator, task: str, inputs: Sequence[str], out_dir: str, sampling: SamplingConfig, seed: int = 0,
             instruction: Instructions = None, question: str | None = None, image_decoding: str = "constrained",
             max_retries: int = MAX_RETRIES) -> list[dict]:
    """`llmcxr generate`'s outputs: one task over a batch of inputs, written to OUT/results.jsonl (one
    {"task", "input", "instruction", "output", "prompt_ids", "generated_ids", "image_codes"} row per
    input; the instruction of vqa is its question, of text the input itself; the ids as in
    TextResults / Drawings.ids) and, for report -> CXR, OUT/image_NNNN.png per image. Report->CXR rows
    also carry "image_decoding" and "retries"; an input that ran out of retries has output null and
    an "error" saying so."""
    if task not in TASKS:
        raise UsageError(f"task {task!r} is not one of {', '.join(TASKS)}")
    if instruction is not None and task not in DEFAULT_INSTRUCTION:
        raise UsageError(f"an instruction applies to the report and image tasks; task {task} takes its own "
                         f"({'the question' if task == 'vqa' else 'the text'}) as the instruction")
    check_decoding(image_decoding, max_retries)
    os.makedirs(out_dir, exist_ok=True)
    extra: list[dict] = [{} for _ in inputs]  # the ids of each row, and report->CXR's decoding record
    if task in ("report", "vqa", "text"):
        if task == "report":
            used = per_input(instruction, len(inputs), task)
            made = g.report_results(inputs, sampling, seed, used)
        elif task == "vqa":
            used = [question or ""] * len(inputs)
            made = g.answer_results(inputs, used, sampling, seed)
        else:
            used = list(inputs)
            made = g.text_results(inputs, sampling, seed)
        outputs, extra = made.texts, [made.ids(i) for i in range(len(inputs))]
    else:
        used = per_input(instruction, len(inputs), task)
        drawn = g.image(inputs, sampling, seed, used, image_decoding, max_retries)
        outputs = [os.path.join(out_dir, f"image_{i:04d}.png") if ok else None for i, ok in enumerate(drawn.ok)]
        for i, (img, path) in enumerate(zip(drawn.images, outputs)):
            extra[i] = drawn.ids(i) | {"image_decoding": image_decoding, "retries": int(drawn.retries[i])}
            if path is None:
                extra[i]["error"] = drawn.failure(i)
            else:
                image_io.save_image(img, path)
    rows = [{"task": task, "input": given, "instruction": ins, "output": made} | more
            for given, ins, made, more in zip(inputs, used, outputs, extra)]
    with open(os.path.join(out_dir, "results.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return rows
