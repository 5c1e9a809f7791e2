"""LLM-CXR's four tasks end to end: CXR -> report, report -> CXR, CXR + question -> answer, and
plain instructions, with the Dolly generation prompt, the VQ-GAN on both sides and the
constrained sampler. Batches are left padded.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llmcxr_jax import checkpoint, sharding
from llmcxr_jax.data import images as image_io
from llmcxr_jax.data import prompts
from llmcxr_jax.errors import UsageError
from llmcxr_jax.infer import generate as gen
from llmcxr_jax.infer.sampling import LLMCXR_TEMPERATURE, LLMCXR_TOP_K, LLMCXR_TOP_P, SamplingConfig

TASKS = ("report", "image", "vqa", "text")
REPORT_TOKENS, IMAGE_EXTRA_TOKENS, TEXT_TOKENS = 128, 3, 256  # LLM-CXR: 128 for reports


@dataclasses.dataclass
class Generator:
    """A trained LM and its VQ-GAN, checked to share one codebook."""

    lm: checkpoint.LoadedLM
    vqgan: object
    encoder: prompts.PromptTokenizer
    open_id: int
    close_id: int
    _encode: object = dataclasses.field(default=None, repr=False)
    _decode: object = dataclasses.field(default=None, repr=False)

    def __post_init__(self):  # jitted once per Generator: a new lambda per call would recompile each batch
        self._encode = jax.jit(lambda x: self.vqgan.encode(x)[0])
        self._decode = jax.jit(self.vqgan.decode)

    @classmethod
    def load(cls, ckpt: str, vqgan_dir: str, mesh_spec: str = "1,-1,1") -> Generator:
        mesh = sharding.make_mesh(mesh_spec)
        lm = checkpoint.load_lm(ckpt, mesh, dtype="float32")
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
        open_id, _, close_id = (int(i) for i in lm.tokenizer.encode(prompts.IMAGE_PLACEHOLDER).ids)
        return cls(lm, vqgan, encoder, open_id, close_id)

    @property
    def codes_per_image(self) -> int:
        return self.vqgan.cfg.latent_size ** 2

    # ---- pieces
    def encode_images(self, paths: Sequence[str]) -> np.ndarray:
        """Image files -> codes [n, h*w]; an unreadable file is a one-line error naming it."""
        cfg = self.vqgan.cfg
        pixels = np.stack([image_io.load_image(p, cfg.resolution, cfg.in_channels) for p in paths])
        return np.asarray(self._encode(jnp.asarray(pixels)))

    def decode_codes(self, codes: np.ndarray) -> np.ndarray:
        return np.asarray(self._decode(jnp.asarray(codes, jnp.int32)))

    def _batch(self, prompts_ids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        width = max(len(p) for p in prompts_ids)
        ids = np.full((len(prompts_ids), width), self.lm.special.pad_id, np.int32)
        mask = np.zeros((len(prompts_ids), width), bool)
        for r, p in enumerate(prompts_ids):
            ids[r, width - len(p):], mask[r, width - len(p):] = p, True
        return ids, mask

    def _run(self, prompt_ids, mode: str, sampling: SamplingConfig, seed: int):
        ids, mask = self._batch(prompt_ids)
        return gen.generate(self.lm.model, ids, mask, layout=self.lm.layout, special=self.lm.special, mode=mode,
                            rng=jax.random.key(seed), sampling=sampling, image_tokens=self.codes_per_image,
                            open_id=self.open_id, close_id=self.close_id)

    @property
    def stop_ids(self) -> tuple[int, int]:
        return self.lm.special.end_key_id, self.lm.special.eos_id

    def responses(self, out) -> list[list[int]]:
        """Each row's generated ids up to (not including) its first stop id."""
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        rows = []
        for r in range(len(tokens)):
            row = [int(t) for t in tokens[r, :lengths[r]]]
            stop = next((i for i, t in enumerate(row) if t in self.stop_ids), len(row))
            rows.append(row[:stop])
        return rows

    def _texts(self, out) -> list[str]:
        return [self.lm.tokenizer.decode(row, skip_special_tokens=True).strip() for row in self.responses(out)]

    # ---- tasks
    def report_prompts(self, image_paths: Sequence[str], instruction: str | None = None) -> list[np.ndarray]:
        """The token ids of the CXR->report prompt of each image (its codes in place of "<image>")."""
        codes = self.encode_images(image_paths)
        text = prompts.generation_prompt(instruction or prompts.REPORT_INSTRUCTIONS[0], prompts.IMAGE_PLACEHOLDER)
        return [self.encoder.encode(text, c) for c in codes]

    def greedy_responses(self, prompt_ids: Sequence[np.ndarray], max_new_tokens: int) -> list[list[int]]:
        """Argmax text responses (image ids masked) as token ids, for comparison with other runtimes."""
        return self.responses(self._run(list(prompt_ids), "text", SamplingConfig.greedy_decoding(max_new_tokens), 0))

    def report(self, image_paths: Sequence[str], sampling: SamplingConfig, seed: int = 0,
               instruction: str | None = None) -> list[str]:
        return self._texts(self._run(self.report_prompts(image_paths, instruction), "text", sampling, seed))

    def answer(self, image_paths: Sequence[str], questions: Sequence[str], sampling: SamplingConfig,
               seed: int = 0) -> list[str]:
        if len(image_paths) != len(questions) or any(not q.strip() for q in questions):
            raise UsageError("vqa needs one non-empty question per image")
        codes = self.encode_images(image_paths)
        ids = [self.encoder.encode(prompts.generation_prompt(q, prompts.IMAGE_PLACEHOLDER), c)
               for q, c in zip(questions, codes)]
        return self._texts(self._run(ids, "text", sampling, seed))

    def text(self, instructions: Sequence[str], sampling: SamplingConfig, seed: int = 0) -> list[str]:
        if any(not i.strip() for i in instructions):
            raise UsageError("an instruction is empty; give the text to respond to")
        ids = [self.encoder.encode(prompts.generation_prompt(i)) for i in instructions]
        return self._texts(self._run(ids, "text", sampling, seed))

    def image(self, reports: Sequence[str], sampling: SamplingConfig, seed: int = 0,
              instruction: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Reports -> (images [n, H, W, C] in [-1, 1], codes [n, h*w]); always exactly h*w codes."""
        if any(not r.strip() for r in reports):
            raise UsageError("a report is empty; give the findings / impression text to draw")
        ins = instruction or prompts.IMAGE_INSTRUCTIONS[0]
        ids = [self.encoder.encode(prompts.generation_prompt(ins, r)) for r in reports]
        out = self._run(ids, "image", sampling, seed)
        tokens = np.asarray(out.tokens)
        n = self.codes_per_image
        codes = self.lm.layout.image_code(tokens[:, 1:1 + n])
        return self.decode_codes(codes), codes


def check_sampling(greedy: bool, temperature: float = LLMCXR_TEMPERATURE, top_p: float = LLMCXR_TOP_P,
                   top_k: int = LLMCXR_TOP_K) -> None:
    """Fail in one line on settings the sampler would refuse, before a model loads."""
    SamplingConfig(max_new_tokens=1, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)


def default_sampling(task: str, greedy: bool, max_new_tokens: int | None, codes_per_image: int,
                     temperature: float = LLMCXR_TEMPERATURE, top_p: float = LLMCXR_TOP_P,
                     top_k: int = LLMCXR_TOP_K) -> SamplingConfig:
    """LLM-CXR's settings by default (temperature 1, top_p 0.92, top_k 0; 128 tokens for reports,
    the image span for images); temperature / top_p / top_k override them when sampling."""
    if max_new_tokens is None:
        max_new_tokens = codes_per_image + IMAGE_EXTRA_TOKENS if task == "image" else \
            REPORT_TOKENS if task in ("report", "vqa") else TEXT_TOKENS
    if greedy:
        return SamplingConfig.greedy_decoding(max_new_tokens)
    return SamplingConfig(max_new_tokens=max_new_tokens, greedy=False, temperature=temperature, top_k=top_k,
                          top_p=top_p)


def run_task(g: Generator, task: str, inputs: Sequence[str], out_dir: str, sampling: SamplingConfig, seed: int = 0,
             instruction: str | None = None, question: str | None = None) -> list[dict]:
    """`llmcxr generate`'s outputs: one task over a batch of inputs, written to OUT/results.jsonl (one
    {"task", "input", "output"} row per input) and, for report -> CXR, OUT/image_NNNN.png per image."""
    os.makedirs(out_dir, exist_ok=True)
    if task == "report":
        outputs = g.report(inputs, sampling, seed, instruction)
    elif task == "vqa":
        outputs = g.answer(inputs, [question or ""] * len(inputs), sampling, seed)
    elif task == "text":
        outputs = g.text(inputs, sampling, seed)
    elif task == "image":
        images, _ = g.image(inputs, sampling, seed, instruction)
        outputs = [os.path.join(out_dir, f"image_{i:04d}.png") for i in range(len(images))]
        for img, path in zip(images, outputs):
            image_io.save_image(img, path)
    else:
        raise UsageError(f"task {task!r} is not one of {', '.join(TASKS)}")
    rows = [{"task": task, "input": given, "output": made} for given, made in zip(inputs, outputs)]
    with open(os.path.join(out_dir, "results.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return rows
