"""`llmcxr demo`: synthetic corpus -> VQ-GAN -> image codes -> tokenizer -> classifier -> LM stage 1
-> stage 2 -> evaluate -> HF / diffusers / taming export -> PyTorch reload, in one workdir.

Each phase records itself in WORKDIR/phases.json when it finishes; a rerun skips finished phases
and the training phases resume from their own checkpoints, so a killed demo continues where it
stopped. WORKDIR/demo_config.json pins the config: another config needs another workdir.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import time
from collections.abc import Callable

import ml_collections
import numpy as np

from llmcxr_jax.data import mimic_cxr
from llmcxr_jax.demo import summary
from llmcxr_jax.demo.phases import NAMES, PHASES
from llmcxr_jax.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Paths:
    """Where each phase writes, under one workdir (a misspelt name is an AttributeError, not a path)."""

    workdir: str

    def _at(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    corpus = property(lambda self: self._at("corpus"))
    vqgan = property(lambda self: self._at("vqgan"))              # the train-vqgan workdir
    vqgan_model = property(lambda self: self._at("vqgan", "vqgan"))
    codes = property(lambda self: self._at("codes"))
    tokenizer = property(lambda self: self._at("tokenizer"))
    classifier = property(lambda self: self._at("classifier"))
    stage1 = property(lambda self: self._at("stage1"))
    stage2 = property(lambda self: self._at("stage2"))
    lm = property(lambda self: self._at("stage2", "checkpoints"))
    eval = property(lambda self: self._at("eval"))
    hf = property(lambda self: self._at("export", "hf"))
    diffusers = property(lambda self: self._at("export", "diffusers"))
    taming = property(lambda self: self._at("export", "taming_vqgan.ckpt"))


def _fitted(spec: str, rows: int) -> str:
    """The demo's batches are fixed by its config, not by the machine: on a device count that does
    not divide a batch (8 GPUs and batch 4, 6 and 32), the spare devices go to the tensor axis."""
    import jax

    from llmcxr_jax import sharding

    return sharding.fit_batch(spec, rows, jax.device_count())


def _fit_mesh(train: ml_collections.ConfigDict) -> None:
    train.mesh = _fitted(train.mesh, train.batch_size // train.get("grad_accum", 1))


def _lm_config(section: ml_collections.ConfigDict, p: Paths) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(section.to_dict())
    c.data.root, c.data.codes, c.data.tokenizer = p.corpus, p.codes, p.tokenizer
    c.train.samples_vqgan = p.vqgan_model  # sampled reports and drawn CXRs in TensorBoard at eval steps
    _fit_mesh(c.train)
    return c


def corpus(config, p: Paths) -> dict:
    from llmcxr_jax import synthetic

    s = synthetic.synthesize(p.corpus, num_images=config.corpus.num_images, image_size=config.corpus.image_size,
                             seed=config.seed)
    return {"images": s["images"], "studies": s["studies"], "vqa_pairs": s["vqa_pairs"]}


def vqgan(config, p: Paths) -> dict:
    from llmcxr_jax.train import vqgan as train_vqgan

    c = ml_collections.ConfigDict(config.vqgan.to_dict())
    c.train.data = p.corpus
    _fit_mesh(c.train)
    train_vqgan.train(c, p.vqgan)
    evals = [r for r in _jsonl(os.path.join(p.vqgan, "metrics.jsonl")) if "eval_l1" in r]
    return {"steps": c.train.steps, "eval_l1_first": evals[0]["eval_l1"], "eval_l1_last": evals[-1]["eval_l1"]}


def codes(config, p: Paths) -> dict:
    from llmcxr_jax.data import encode

    records = mimic_cxr.load_corpus(p.corpus, progress=False).records
    s = encode.encode_images(p.vqgan_model, [(r.dicom_id, r.image_path) for r in records], p.codes,
                             batch_size=config.encode_batch_size,
                             mesh=_fitted("-1,1,1", config.encode_batch_size))
    return {"images": s["num_images"], "codes_per_image": s["codes_per_image"], "codebook_size": s["codebook_size"]}


def tokenizer(config, p: Paths) -> dict:
    from llmcxr_jax import vocab
    from llmcxr_jax.data import text_tokenizer

    tok, _, _ = text_tokenizer.train_tokenizer(text_tokenizer.corpus_texts(p.corpus), p.tokenizer,
                                               vocab_size=config.tokenizer.vocab_size)
    return {"text_size": vocab.text_size(tok)}


def classifier(config, p: Paths) -> dict:
    """The CNN that scores report->CXR images. It trains on the VQ-GAN's reconstructions of the
    train-split frontal images (decoded from their codes), the domain the LM's images live in: a
    classifier of sharp images would score the VQ-GAN's blur, not the LM's drawing."""
    import jax

    from llmcxr_jax import checkpoint, sharding
    from llmcxr_jax.data import codes as code_files
    from llmcxr_jax.eval import cxr_classifier as C
    from llmcxr_jax.eval.evaluate import gray

    c = config.classifier
    cfg = C.ClassifierConfig(image_size=config.corpus.image_size, widths=tuple(c.widths), hidden=c.hidden)
    corpus_ = mimic_cxr.load_corpus(p.corpus, progress=False)
    table = code_files.read_codes(p.codes)
    train = [r for r in corpus_.records if r.split == "train" and r.view in ("PA", "AP")
             and table.get(r.dicom_id) is not None]
    vq, _ = checkpoint.load_vqgan(p.vqgan_model, sharding.make_mesh("-1,1,1"))
    decode = jax.jit(vq.decode)
    codes_ = np.stack([np.asarray(table.get(r.dicom_id), np.int32) for r in train])
    images = np.concatenate([np.asarray(decode(codes_[i:i + 64])) for i in range(0, len(codes_), 64)])
    model = C.train_classifier(gray(images, cfg.image_size),
                               C.targets_for(train, mimic_cxr.read_chexpert_labels(p.corpus)), cfg,
                               steps=c.steps, batch=c.batch, lr=c.lr, seed=config.seed)
    C.save_classifier(model, cfg, p.classifier)
    return {"train_images": len(train), "trained_on": "VQ-GAN reconstructions"}


def _stage(config, p: Paths, stage: int) -> dict:
    from llmcxr_jax.infer import train_samples
    from llmcxr_jax.train import lm

    c = _lm_config(config.stage1 if stage == 1 else config.stage2, p)
    if stage == 2:
        c.train.init_from = p.stage1
    lm.train(c, p.stage1 if stage == 1 else p.stage2, sampler=train_samples.sampler)
    rows = _jsonl(os.path.join(p.stage1 if stage == 1 else p.stage2, "metrics.jsonl"))
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    return {"steps": c.train.steps, "loss_first": losses[0], "loss_last": losses[-1],
            "eval_loss_last": evals[-1] if evals else None}


def stage1(config, p: Paths) -> dict:
    return _stage(config, p, 1)


def stage2(config, p: Paths) -> dict:
    return _stage(config, p, 2)


def evaluate(config, p: Paths) -> dict:
    from llmcxr_jax.eval import evaluate as ev

    opts = ev.EvalOptions(classifier=p.classifier, seed=config.seed, **config.evaluate.to_dict())
    m = ev.evaluate(p.lm, p.vqgan_model, p.corpus, p.eval, opts)
    return {"n_images": m["n_images"], "n_vqa": m.get("n_vqa", 0),
            "label_f1_micro": m["report"]["labels"]["f1_micro"],
            "classifier_auroc_micro": m["image"]["classifier"]["auroc_micro"]}


def export(config, p: Paths) -> dict:
    from llmcxr_jax import checkpoint, sharding
    from llmcxr_jax.convert import diffusers_vqgan, hf_gpt_neox, taming_vqgan

    lm = checkpoint.load_lm(p.lm, sharding.make_mesh("1,-1,1"), dtype="float32")
    files = hf_gpt_neox.export_hf(lm.model, p.hf, hf_config=lm.metadata.get("hf_config"),
                                  image_codes=lm.layout.image_codes, tokenizer=lm.tokenizer,
                                  tokenizer_config=lm.tokenizer_config, special=lm.special)
    model, _ = checkpoint.load_vqgan(p.vqgan_model, sharding.make_mesh("-1,1,1"))
    diffusers_vqgan.export_diffusers(model, p.diffusers)
    taming_vqgan.write_ckpt(model, p.taming)
    return {"hf_files": files, "diffusers": p.diffusers, "taming": p.taming}


def pytorch(config, p: Paths) -> dict:
    """Reload the exports in PyTorch: transformers writes a greedy report for the first evaluation
    image from the same prompt ids as our sampler, and diffusers decodes the image's codes."""
    from llmcxr_jax.convert import torch_reload
    from llmcxr_jax.infer import tasks

    g = tasks.Generator.load(p.lm, p.vqgan_model)
    record = mimic_cxr.evaluation_records(mimic_cxr.load_corpus(p.corpus, progress=False))[0]
    prompt = g.report_prompts([record.image_path])[0]
    n = config.pytorch.max_new_tokens
    ours = g.greedy_responses([prompt], n)[0]
    layout = g.lm.layout
    theirs = torch_reload.torch_greedy(p.hf, prompt.tolist(), max_new_tokens=n, stop_ids=g.stop_ids,
                                       suppress_ids=range(layout.text_size, layout.size))
    codes_ = g.encode_images([record.image_path])
    decoded = torch_reload.diffusers_decode(p.diffusers, codes_)
    text = lambda ids: g.lm.tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    return {"dicom_id": record.dicom_id, "reference": mimic_cxr.stage_text(record, 2), "jax_report": text(ours),
            "torch_report": text(theirs), "same_tokens": ours == theirs, "tokens": len(ours),
            "diffusers_decode_max_abs_diff": float(np.abs(decoded - g.decode_codes(codes_)).max())}


RUNNERS: dict[str, Callable] = {"corpus": corpus, "vqgan": vqgan, "codes": codes, "tokenizer": tokenizer,
                               "classifier": classifier, "stage1": stage1, "stage2": stage2, "evaluate": evaluate,
                               "export": export, "pytorch": pytorch}
if tuple(RUNNERS) != NAMES:
    raise RuntimeError(f"demo/phases.py names {NAMES} but pipeline.RUNNERS runs {tuple(RUNNERS)}")


def _jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _claim(config, workdir: str) -> None:
    path = os.path.join(workdir, "demo_config.json")
    now = json.loads(config.to_json_best_effort())
    if os.path.isfile(path):
        with open(path) as f:
            if json.load(f) != now:
                raise UsageError(f"{workdir} holds a demo run with a different config; give a new --workdir "
                                 "(or delete it)")
        return
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(now, f, indent=2)


def _write_json(path: str, value) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, default=float)
    os.replace(tmp, path)


def run(config: ml_collections.ConfigDict, workdir: str, *, only: tuple[str, ...] = (),
        log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Run (or finish) every phase in `workdir`; returns phases.json's content. `only` stops
    after the named phases have run (the earlier ones still run first)."""
    _claim(config, workdir)
    p = Paths(workdir)
    state_path = os.path.join(workdir, "phases.json")
    state = json.load(open(state_path)) if os.path.isfile(state_path) else {}
    last = max((i for i, name in enumerate(NAMES) if name in only), default=len(PHASES) - 1)
    for i, (name, what, *_) in enumerate(PHASES[: last + 1]):
        tag = f"[demo {i + 1}/{len(PHASES)}] {name}"
        if name in state:
            log(f"{tag}: done before ({state[name]['seconds']:.0f} s), skipped")
            continue
        log(f"{tag}: {what}")
        start = time.perf_counter()
        result = RUNNERS[name](config, p)
        state[name] = {"seconds": time.perf_counter() - start, "result": result}
        _write_json(state_path, state)
        log(f"{tag}: finished in {state[name]['seconds']:.0f} s")
    if all(name in state for name in NAMES):
        summary.write(config, workdir, state)
        log(f"[demo] summary: {os.path.join(workdir, 'summary.md')}")
        log(f"[demo] try the model in a browser: {serve_command(workdir)}")
    return state


def serve_command(workdir: str) -> str:
    """The `llmcxr serve` command line for the LM and VQ-GAN a demo workdir trained."""
    p = Paths(workdir)
    return f"llmcxr serve --ckpt {shlex.quote(p.lm)} --vqgan {shlex.quote(p.vqgan_model)}"
