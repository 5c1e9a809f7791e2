"""The model behind `llmcxr serve`, free of gradio: one api.Generator whose decoders are compiled at
start-up (`warm_up`, with the step hook the page's progress bars use), a status line saying how far
that got, and the three requests, one at a time, with bad input as a UsageError the page shows."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from llmcxr_jax import api
from llmcxr_jax.errors import UsageError

WARM_UP_REPORT = "No acute cardiopulmonary process."
WARM_UP_QUESTION = "Is there a pleural effusion?"


def _ignore(done: int, total: int) -> None:
    """A progress listener that drops what it is told: warm-up compiles the decoders the pages use."""


class Session:
    """What the page's buttons call. Until `warm_up` has compiled every task, `status` says which
    one compiles and requests wait; generation runs one request at a time (one accelerator)."""

    def __init__(self, generator: api.Generator):
        self.generator = generator
        self.status = "Loading the model ..."
        self.ready = threading.Event()
        self._lock = threading.Lock()

    def warm_up(self, log: Callable[[str], None]) -> None:
        """Compile, once, what every request runs: the VQ-GAN's encoder and decoder on one image and
        the LM's two decoders (reports and answers share one; images have their own), each with
        the step hook. A blank image and a stock report are the inputs."""
        g = self.generator
        blank = np.zeros((g.resolution, g.resolution), np.uint8)
        stages = (("reports and answers", lambda: g.report(blank, progress=_ignore)),
                  (f"images ({g.codes_per_image} codes)", lambda: g.image(WARM_UP_REPORT, progress=_ignore)))
        for i, (what, run) in enumerate(stages):
            self.status = f"Compiling the sampler for {what}, {i + 1} of {len(stages)} (once, at start-up) ..."
            log(self.status)
            start = time.perf_counter()
            run()
            log(f"compiled the sampler for {what} in {time.perf_counter() - start:.0f} s")
        g.answer(blank, WARM_UP_QUESTION, progress=_ignore)  # the report program: no compile
        self.status = "Ready: the sampler is compiled."
        self.ready.set()

    def _run(self, fn: Callable[[], object]):
        self.ready.wait()
        with self._lock:
            return fn()

    def report(self, image, seed: int, temperature: float, progress: api.Progress | None = None) -> str:
        """An uploaded CXR (path, PIL image or array) -> report text."""
        _need_image(image)
        return self._run(lambda: self.generator.report(image, seed=int(seed), temperature=float(temperature),
                                                       progress=progress))

    def draw(self, report: str, seed: int, temperature: float, progress: api.Progress | None = None) -> np.ndarray:
        """Report text -> a drawn CXR, uint8 [H, W] (or [H, W, 3])."""
        if not (report or "").strip():
            raise UsageError("the report is empty; type the findings / impression to draw")
        return self._run(lambda: self.generator.image(report, seed=int(seed), temperature=float(temperature),
                                                      progress=progress))

    def answer(self, image, question: str, seed: int, temperature: float,
               progress: api.Progress | None = None) -> str:
        """An uploaded CXR + a question -> answer text."""
        _need_image(image)
        if not (question or "").strip():
            raise UsageError("the question is empty; type a question about the image")
        return self._run(lambda: self.generator.answer(image, question, seed=int(seed),
                                                       temperature=float(temperature), progress=progress))


def _need_image(image) -> None:
    if image is None:
        raise UsageError("no image; upload a chest X-ray (JPEG or PNG) first")
