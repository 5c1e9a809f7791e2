"""What `llmcxr evaluate` writes besides metrics.json: the markdown table with the paper's LLM-CXR
numbers beside ours and a chance baseline, and PNG grids of real vs generated CXRs with captions.
"""
from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from llmcxr_jax.data import images as image_io
from llmcxr_jax.errors import UsageError

# (task, metric, metrics.json path, LLM-CXR in the paper, the paper's best baseline); REFERENCE.md
PAPER_ROWS = (
    ("CXR->report", "label F1 micro (14 obs.)", "report.labels.f1_micro", "0.360", "UniXGen-512 0.413"),
    ("CXR->report", "label F1 macro (14 obs.)", "report.labels.f1_macro", "0.211", "UniXGen-512 0.245"),
    ("CXR->report", "label AUROC micro", "report.labels.auroc_micro", "0.628", "UniXGen-512 0.668"),
    ("CXR->report", "BLEU-4", "report.text.bleu_4", "", ""),
    ("CXR->report", "ROUGE-L", "report.text.rouge_l", "", ""),
    ("CXR->report", "CIDEr-D", "report.text.cider_d", "", ""),
    ("report->CXR", "FID, txv DenseNet features", "image.fid_txv", "0.714", "RoentGen 6.04"),
    ("report->CXR", "FID, classifier features", "image.fid_classifier", "", ""),
    ("report->CXR", "classifier AUROC micro", "image.classifier.auroc_micro", "0.79-0.81", "UniXGen 0.74"),
    ("report->CXR", "classifier AUROC micro, real images", "image.classifier_real.auroc_micro", "", ""),
    ("report->CXR", "classifier AUROC micro, VQ-GAN reconstructions", "image.classifier_reconstructed.auroc_micro",
     "", ""),
    ("CXR-VQA", "score, all questions", "vqa.all.score", "44.8%", "ELIXR 54.8%"),
    ("VQ-GAN", "reconstruction PSNR (dB)", "vqgan.psnr", "", ""),
    ("VQ-GAN", "reconstruction SSIM", "vqgan.ssim", "", ""),
)

FOCUS = ("Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Support Devices")


def lookup(metrics: dict, path: str):
    node = metrics
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _fmt(value, missing: str = "not run") -> str:
    if value is None:
        return missing
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _with_ci(row: dict | None, key: str) -> str:
    """A per-class score with its bootstrap interval when the evaluation computed one."""
    row = row or {}
    ci = row.get(f"{key}_ci")
    value = _fmt(row.get(key))
    return value if not ci or any(math.isnan(b) for b in ci) else f"{value} ({ci[0]:.2f}-{ci[1]:.2f})"


def _decoding(options: dict | None) -> str:
    """' Decoding: ...' for the table's preamble (nothing when the options are unknown)."""
    if not options:
        return ""
    if options.get("greedy"):
        return " Decoding: greedy."
    t, image_t = options.get("temperature"), options.get("image_temperature")
    drawn = f" (drawings {image_t:g})" if image_t is not None and image_t != t else ""
    return (f" Decoding: sampled at temperature {t:g}{drawn}, top_p {options.get('top_p'):g}, "
            f"top_k {options.get('top_k')} (0: off).")


def markdown(metrics: dict) -> str:
    """The evaluation as markdown: headline rows beside the paper, per-class label F1 for the
    findings the synthetic corpus draws, and VQA by question type, each with its chance baseline."""
    base = metrics.get("baselines", {})
    lines = [f"# LLM-CXR evaluation: {metrics.get('checkpoint', '')}", "",
             f"{metrics.get('n_images', 0)} evaluation images, {metrics.get('n_vqa', 0)} VQA questions, "
             f"labels by {metrics.get('labels_from', 'the rule-based labeler')}. The paper's numbers are on "
             "MIMIC-CXR with the CheXpert labeler; on another corpus they are context, not targets." +
             _decoding(metrics.get("options")), "",
             "| task | metric | ours | chance baseline | LLM-CXR (paper) | best baseline (paper) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for task, name, path, paper, best in PAPER_ROWS:
        lines.append(f"| {task} | {name} | {_fmt(lookup(metrics, path))} | {_fmt(lookup(base, path))} | "
                     f"{paper or '-'} | {best or '-'} |")
    per = lookup(metrics, "report.labels.per_class")
    if per:
        lines += ["", "CXR->report label F1 by finding (chance: a random report with the reference prevalence); "
                  "in brackets, 95% bootstrap intervals over the evaluation images:", "",
                  "| finding | support | F1 | chance F1 | classifier AUROC (chance 0.5): generated images | "
                  "real images | reconstructions |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        gen = lookup(metrics, "image.classifier.per_class") or {}
        real = lookup(metrics, "image.classifier_real.per_class") or {}
        recon = lookup(metrics, "image.classifier_reconstructed.per_class") or {}
        chance = lookup(base, "report.labels.per_class") or {}
        for name in FOCUS:
            c = per.get(name, {})
            lines.append(f"| {name} | {c.get('support', 0)} | {_with_ci(c, 'f1')} | "
                         f"{_fmt((chance.get(name) or {}).get('f1'))} | {_with_ci(gen.get(name), 'auroc')} | "
                         f"{_with_ci(real.get(name), 'auroc')} | {_with_ci(recon.get(name), 'auroc')} |")
    vqa = metrics.get("vqa")
    if vqa:
        lines += ["", "CXR-VQA score by question type (chance: the most frequent answer of the type):", "",
                  "| type | questions | score | chance |", "| --- | --- | --- | --- |"]
        for kind, row in vqa.items():
            lines.append(f"| {kind} | {row['count']} | {_fmt(row['score'])} | "
                         f"{_fmt(lookup(base, f'vqa.{kind}.score'), '-')} |")
    return "\n".join(lines) + "\n"


def _caption(text: str, width: int, lines: int) -> list[str]:
    wrapped = textwrap.wrap(" ".join(text.split()), width=width) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: max(0, width - 3)] + "..."
    return wrapped


def write_grid(path: str, real: np.ndarray, fake: np.ndarray, captions: Sequence[str], tile: int = 128,
               caption_lines: int = 8) -> None:
    """Column i: real image i over the image generated from its report, then the caption (the
    report the image was drawn from). Images are [n, H, W, C] in [-1, 1]."""
    if len(real) != len(fake) or len(real) != len(captions) or not len(real):
        raise UsageError(f"a grid needs as many real images, generated images and captions, got "
                         f"{len(real)}, {len(fake)}, {len(captions)}")
    font = ImageFont.load_default()
    chars = max(8, tile // 6)
    line_h = 11
    label_h, text_h = 12, caption_lines * line_h + 4
    n = len(real)
    canvas = Image.new("RGB", (n * tile, label_h + 2 * tile + text_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        x = i * tile
        for row, img in enumerate((real[i], fake[i])):
            pic = Image.fromarray(image_io.to_uint8(img).squeeze()).convert("RGB").resize((tile, tile))
            canvas.paste(pic, (x, label_h + row * tile))
        draw.text((x + 2, 0), "real / generated", fill="black", font=font)
        for k, line in enumerate(_caption(captions[i], chars, caption_lines)):
            draw.text((x + 2, label_h + 2 * tile + 2 + k * line_h), line, fill="black", font=font)
    canvas.save(path)
