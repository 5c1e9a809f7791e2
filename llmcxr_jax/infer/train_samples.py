"""What `train` shows of its model at each eval step (train.samples, train.samples_vqgan): reports sampled for
the first held-out images and CXRs drawn from their reference reports, through the same Generator as `generate`.
The trainer cannot import infer/ (the layer rule), so the CLI hands it `sampler`, which the trainer calls with the
run's start, data sources and mesh once, then with its current model at each eval step (every process: the
sampler's jits are collective; process 0 logs)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from llmcxr_jax import checkpoint
from llmcxr_jax.data import prompts
from llmcxr_jax.errors import UsageError
from llmcxr_jax.infer import tasks
from llmcxr_jax.train import tensorboard

Samples = tuple[str, list[np.ndarray]]  # markdown table; grid rows [n, H, W, C] in [-1, 1]


def sampler(config, start, sources, mesh) -> Callable[[Any], Samples] | None:
    """The eval-step hook of a run, or None when train.samples_vqgan is empty or train.samples is 0: a function
    of the current model -> (a table of dicom id, reference and sampled report; rows of VQ-GAN reconstructions
    of the real codes over the CXRs drawn from the reference reports)."""
    t = config.train
    if not t.get("samples_vqgan", "") or int(t.get("samples", 0)) <= 0 or not t.eval_every:
        return None
    if start.special is None:
        raise UsageError("train.samples_vqgan needs the model's special-token ids (a tokenizer with the Dolly keys)")
    vqgan, _ = checkpoint.load_vqgan(t.samples_vqgan, mesh)
    if vqgan.cfg.n_embed != start.layout.image_codes or vqgan.cfg.latent_size ** 2 != sources.codes_per_image:
        raise UsageError(f"train.samples_vqgan {t.samples_vqgan} has {vqgan.cfg.n_embed} codes of "
                         f"{vqgan.cfg.latent_size ** 2} per image; the run's codes have {start.layout.image_codes} "
                         f"of {sources.codes_per_image}: give the VQ-GAN data.codes came from")
    examples = [e for e in sources.held_out["image_text"] if e.report.strip() and e.dicom_id in sources.codes]
    examples = examples[:int(t.samples)]
    if not examples:
        return None
    codes = np.stack([np.asarray(sources.codes[e.dicom_id]) for e in examples])
    reports = [e.report for e in examples]
    lm = checkpoint.LoadedLM(model=None, config=start.config, layout=start.layout, special=start.special,
                             tokenizer=start.tokenizer, tokenizer_config=start.tokenizer_config, metadata={}, step=0)
    open_id, _, close_id = (int(i) for i in start.tokenizer.encode(prompts.IMAGE_MARKER).ids)
    g = tasks.Generator(lm, vqgan, prompts.PromptTokenizer(start.tokenizer, start.layout, start.special),
                        open_id, close_id)
    report_sampling = tasks.default_sampling("report", False, None, g.codes_per_image)
    image_sampling = tasks.default_sampling("image", False, None, g.codes_per_image)
    real = g.decode_codes(codes)  # what the images look like through the VQ-GAN: the drawings' reference
    seed = int(t.seed)

    def samples(model) -> Samples:
        g.lm.model = model
        written = g.report_from_codes(codes, report_sampling, seed).texts
        drawn = g.image(reports, image_sampling, seed).images
        table = tensorboard.markdown_table(("dicom id", "reference report", "sampled report"),
                                           [(e.dicom_id, e.report, w) for e, w in zip(examples, written)])
        return table, [real, drawn]

    return samples

