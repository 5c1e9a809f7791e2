"""The Python face of llmcxr-jax: a trained LLM-CXR (LM + VQ-GAN) that turns one CXR into a report,
one report into a CXR, and one CXR + question into an answer, with LLM-CXR's sampling by default.
`from llmcxr_jax import Generator` gives this class; infer/tasks.py's Generator (its `batch`) does
the work, many inputs at a time, with the token ids behind each result."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np

from llmcxr_jax.data import images as image_io
from llmcxr_jax.errors import UsageError
from llmcxr_jax.infer import generate as gen
from llmcxr_jax.infer import tasks
from llmcxr_jax.infer.sampling import LLMCXR_TEMPERATURE, LLMCXR_TOP_K, LLMCXR_TOP_P, SamplingConfig

# Every prompt is left padded to an image's codes plus this many tokens (rounded up to 64): room for
# the instruction and a report or question of some 200 words; a longer prompt is a one-line error.
PROMPT_TEXT_TOKENS = 256
# progress(done, total): report and answer tokens sampled of at most max_new_tokens, or image codes drawn of h*w
Progress = Callable[[int, int], None]


class Generator:
    """One input at a time, sampled as LLM-CXR sampled (temperature 1, top_p 0.92, top_k 0) unless
    told otherwise. Every prompt is left padded to one width (`batch.prompt_width`, prompt_width()),
    so each task compiles its decoder once, whatever the input's length.

        g = Generator.from_checkpoints("runs/demo_quick/stage2/checkpoints", "runs/demo_quick/vqgan/vqgan")
        g.report("cxr.png")                        # -> str
        g.image("Small left pleural effusion.")    # -> uint8 [H, W, 3] (RGB VQ-GAN) or [H, W]
        g.answer("cxr.png", "Is there an effusion?")
    """

    def __init__(self, batch: tasks.Generator):
        self.batch = batch  # the batch Generator (infer/tasks.py): many inputs, token ids, retry decoding
        if not batch.prompt_width:
            batch.prompt_width = prompt_width(batch.codes_per_image, batch.lm.model.cfg.max_position_embeddings)

    @classmethod
    def from_checkpoints(cls, ckpt: str, vqgan: str, *, dtype: str = "float32", mesh: str = "1,-1,1",
                         **text_decoding) -> Generator:
        """Load an LM checkpoint (import-hf output, a train WORKDIR or its checkpoints/) and the VQ-GAN
        its image codes came from (import-vqgan output, a train-vqgan WORKDIR or its vqgan/).

        dtype: the LM's compute dtype ("float32" or "bfloat16", LLM-CXR's); mesh: data,fsdp,tensor.
        text_decoding: tasks.Generator.load's switches (clean_up_spaces, allow_image_tokens_in_text,
        stop_at_end_key_only, keep_special_tokens). A missing path, a checkpoint without image-token
        rows or a VQ-GAN of another codebook is a one-line UsageError."""
        return cls(tasks.Generator.load(ckpt, vqgan, mesh_spec=mesh, dtype=dtype, **text_decoding))

    @property
    def codes_per_image(self) -> int:
        """h*w: the image tokens of one CXR (256 in LLM-CXR, 64 in the demo)."""
        return self.batch.codes_per_image

    @property
    def resolution(self) -> int:
        """The side of the CXRs the VQ-GAN reads and draws, in pixels."""
        return self.batch.vqgan.cfg.resolution

    def report(self, image: tasks.ImageInput, *, seed: int = 0, temperature: float = LLMCXR_TEMPERATURE,
               top_p: float = LLMCXR_TOP_P, top_k: int = LLMCXR_TOP_K, greedy: bool = False,
               max_new_tokens: int | None = None, instruction: str | None = None,
               progress: Progress | None = None) -> str:
        """CXR -> report text. image: a path, the file's bytes, a PIL image or a uint8 / uint16 array of
        any size (read as `llmcxr generate` reads files). instruction: default, our first paraphrase."""
        _one(image, "image", "one CXR")
        sampling = self._sampling("report", greedy, max_new_tokens, temperature, top_p, top_k)
        with self._reporting(progress, text=True):
            return self.batch.report_results([image], sampling, seed, instruction).texts[0]

    def image(self, report: str, *, seed: int = 0, temperature: float = LLMCXR_TEMPERATURE,
              top_p: float = LLMCXR_TOP_P, top_k: int = LLMCXR_TOP_K, greedy: bool = False,
              instruction: str | None = None, progress: Progress | None = None) -> np.ndarray:
        """Report text -> a drawn CXR, uint8 [H, W] ([H, W, 3] for an RGB VQ-GAN such as LLM-CXR's).
        The response is constrained to exactly h*w image codes, so every call draws an image."""
        if not isinstance(report, str):
            raise UsageError(f"report must be one string, got {type(report).__name__}; for many use .batch.image")
        sampling = self._sampling("image", greedy, None, temperature, top_p, top_k)
        with self._reporting(progress, text=False):
            drawn = self.batch.image([report], sampling, seed, instruction)
        pixels = image_io.to_uint8(drawn.images[0])
        return pixels[..., 0] if pixels.shape[-1] == 1 else pixels

    def answer(self, image: tasks.ImageInput, question: str, *, seed: int = 0,
               temperature: float = LLMCXR_TEMPERATURE, top_p: float = LLMCXR_TOP_P, top_k: int = LLMCXR_TOP_K,
               greedy: bool = False, max_new_tokens: int | None = None, progress: Progress | None = None) -> str:
        """CXR + question -> answer text (image as in `report`)."""
        _one(image, "image", "one CXR")
        if not isinstance(question, str):
            raise UsageError(f"question must be one string, got {type(question).__name__}")
        sampling = self._sampling("vqa", greedy, max_new_tokens, temperature, top_p, top_k)
        with self._reporting(progress, text=True):
            return self.batch.answer_results([image], [question], sampling, seed).texts[0]

    def _sampling(self, task: str, greedy: bool, max_new_tokens: int | None, temperature: float, top_p: float,
                  top_k: int) -> SamplingConfig:
        return tasks.default_sampling(task, greedy, max_new_tokens, self.codes_per_image, temperature=temperature,
                                      top_p=top_p, top_k=top_k)

    @contextlib.contextmanager
    def _reporting(self, progress: Progress | None, text: bool) -> Iterator[None]:
        """Decode with gen.reporting_steps when asked: text tokens as sampled, or the image's codes
        (the response's first position is "<", then h*w codes)."""
        if progress is None:
            yield
            return
        n = self.codes_per_image
        tell = progress if text else lambda emitted, _max: progress(min(max(emitted - 1, 0), n), n)
        with gen.reporting_steps(tell):
            yield


def prompt_width(codes_per_image: int, context: int) -> int:
    """The one width every prompt is padded to: an image's codes plus PROMPT_TEXT_TOKENS, rounded up to
    64, within the context less the longest response (a report's 128 tokens or an image's span)."""
    room = context - max(tasks.REPORT_TOKENS, codes_per_image + tasks.IMAGE_EXTRA_TOKENS)
    want = -(-(codes_per_image + PROMPT_TEXT_TOKENS) // 64) * 64
    if room < codes_per_image + 16:
        raise UsageError(f"the LM's context ({context} positions) has no room for an image's {codes_per_image} "
                         "codes, a prompt and a response")
    return min(want, room)


def _one(value, name: str, what: str) -> None:
    if isinstance(value, (list, tuple)):
        raise UsageError(f"{name} must be {what}, got a {type(value).__name__}; for many inputs use .batch")
