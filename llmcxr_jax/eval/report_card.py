"""What `llmcxr evaluate` writes besides metrics.json: metrics.md (the protocol that ran, ours with
bootstrap intervals beside a chance baseline, the paper's LLM-CXR numbers and the difference, each
missing number with what fills it; per-finding tables) and PNG grids of real vs generated CXRs.
"""
from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from llmcxr_jax.data import images as image_io
from llmcxr_jax.data.mimic_cxr import CHEXPERT_LABELS
from llmcxr_jax.errors import UsageError

TXV_CLASSIFIER_FILL = "--txv-weights FILE holding the whole torchxrayvision classifier"


class Row(NamedTuple):
    """One line of metrics.md's headline table."""

    task: str
    metric: str
    path: str    # ours in metrics.json; its 95% bootstrap interval, when computed, at path + "_ci"
    paper: str   # LLM-CXR in the paper (shared/REFERENCE.md, "Headline numbers"): "0.360", "0.79-0.81", "44.8%"
    best: str    # the paper's best baseline
    fill: str    # what makes the number when it is missing


PAPER_ROWS = (
    Row("CXR->report", "label F1 micro (14 obs.)", "report.labels.f1_micro", "0.360", "UniXGen-512 0.413",
        "--tasks report"),
    Row("CXR->report", "label F1 macro (14 obs.)", "report.labels.f1_macro", "0.211", "UniXGen-512 0.245",
        "--tasks report"),
    Row("CXR->report", "label AUROC micro", "report.labels.auroc_micro", "0.628", "UniXGen-512 0.668",
        "--tasks report"),
    Row("CXR->report", "BLEU-4", "report.text.bleu_4", "", "", "--tasks report"),
    Row("CXR->report", "METEOR", "report.text.meteor", "", "", "--meteor (Java)"),
    Row("CXR->report", "ROUGE-L", "report.text.rouge_l", "", "", "--tasks report"),
    Row("CXR->report", "CIDEr-D", "report.text.cider_d", "", "", "--tasks report"),
    Row("report->CXR", "FID, Inception-v3 features", "image.fid_inception", "22.75", "RoentGen 42.38",
        "--inception-weights FILE"),
    Row("report->CXR", "FID, txv DenseNet features", "image.fid_txv", "0.714", "RoentGen 6.04", "--txv-weights FILE"),
    Row("report->CXR", "txv classifier AUROC micro", "image.txv_classifier.auroc_micro", "0.79-0.81", "UniXGen 0.74",
        TXV_CLASSIFIER_FILL),
    Row("report->CXR", "txv classifier AUROC macro", "image.txv_classifier.auroc_macro", "", "", TXV_CLASSIFIER_FILL),
    Row("report->CXR", "txv classifier F1 micro", "image.txv_classifier.f1_micro", "", "", TXV_CLASSIFIER_FILL),
    Row("report->CXR", "txv classifier F1 macro", "image.txv_classifier.f1_macro", "", "", TXV_CLASSIFIER_FILL),
    Row("report->CXR", "txv classifier AUROC micro, real images", "image.txv_classifier_real.auroc_micro", "", "",
        TXV_CLASSIFIER_FILL),
    Row("report->CXR", "our classifier AUROC micro", "image.classifier.auroc_micro", "", "", "--classifier DIR"),
    Row("report->CXR", "our classifier AUROC micro, real images", "image.classifier_real.auroc_micro", "", "",
        "--classifier DIR"),
    Row("report->CXR", "our classifier AUROC micro, VQ-GAN reconstructions",
        "image.classifier_reconstructed.auroc_micro", "", "", "--classifier DIR"),
    Row("report->CXR", "FID, our classifier's features", "image.fid_classifier", "", "", "--classifier DIR"),
    Row("CXR-VQA", "score, all questions", "vqa.all.score", "44.8%", "ELIXR 54.8%", "--tasks vqa"),
    Row("VQ-GAN", "reconstruction PSNR (dB)", "vqgan.psnr", "", "", ""),
    Row("VQ-GAN", "reconstruction SSIM", "vqgan.ssim", "", "", ""),
)

FOCUS = ("Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Support Devices")


def lookup(metrics: dict, path: str):
    node = metrics
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _fmt(value, missing: str = "not run", percent: bool = False) -> str:
    if value is None:
        return missing
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if percent:
        return f"{100 * value:.1f}%"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _interval(ci, percent: bool = False) -> str:
    """' (lower-upper)' of a bootstrap interval, nothing when there is none."""
    if not ci or any(b is None or math.isnan(b) for b in ci):
        return ""
    return f" ({100 * ci[0]:.1f}-{100 * ci[1]:.1f}%)" if percent else f" ({ci[0]:.3f}-{ci[1]:.3f})"


def _with_ci(row: dict | None, key: str) -> str:
    """A per-class score with its bootstrap interval when the evaluation computed one."""
    row = row or {}
    ci = row.get(f"{key}_ci")
    value = _fmt(row.get(key))
    return value if not ci or any(math.isnan(b) for b in ci) else f"{value} ({ci[0]:.2f}-{ci[1]:.2f})"


def _difference(ours, paper: str) -> str:
    """ours - the paper's number; a range counts from its nearer end (0 inside); a percentage in points."""
    if not paper:
        return "-"
    if ours is None or (isinstance(ours, float) and math.isnan(ours)):
        return "-"
    if paper.endswith("%"):
        return f"{100 * ours - float(paper[:-1]):+.1f} pts"
    if "-" in paper:
        low, high = (float(v) for v in paper.split("-"))
        if low <= ours <= high:
            return "within"
        end = low if ours < low else high
        return f"{ours - end:+.3f} (to {end:g})"
    return f"{ours - float(paper):+.3f}"


def _missing(metrics: dict, row: Row) -> str:
    """Why a row has no number, and what gives it one."""
    task = {"CXR->report": "report", "report->CXR": "image", "CXR-VQA": "vqa"}.get(row.task)
    if task and task not in metrics:
        return f"not run (--tasks {task})"
    if task == "image" and not (metrics.get("image") or {}).get("n"):
        return "no image was made"
    why = lookup(metrics, row.path + "_not_computed")
    if why:
        return f"not computed: {why}"
    return f"missing: {row.fill}" if row.fill else "not run"


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


def _protocol(metrics: dict) -> list[str]:
    """What protocol ran, the selection, the departures from the paper and the missing inputs."""
    p = metrics.get("protocol")
    if not p:
        return []
    sel = p.get("selection", {})
    source = (f"the evaluation list {sel['eval_list']}" if sel.get("eval_list") else
              "the selection rebuilt from the metadata (validate + test, PA/AP of each subject's earliest study)")
    if p.get("name") == "paper":
        lines = [f"Protocol: paper (`--protocol paper`): LLM-CXR's evaluation on {source}, impression text, "
                 "sampling at top_p 0.92, top_k 0, temperature 1, every report and image metric; 95% percentile "
                 "bootstrap intervals over the evaluation images in brackets (none for BLEU, METEOR and FID, "
                 "statistics of the whole set)."]
    else:
        lines = [f"Protocol: the options as given (`--protocol paper` runs the paper's), on {source}."]
    if p.get("departures"):
        lines += ["", "Departures from the paper:", *(f"- {d}" for d in p["departures"])]
    if p.get("missing"):
        lines += ["", "Missing columns (the run goes on without them):",
                  *(f"- {cells}: {fill}" for cells, fill in p["missing"])]
    return [*lines, ""]


def markdown(metrics: dict) -> str:
    """The evaluation as markdown: the protocol, the headline rows beside the paper's numbers (with
    the difference and chance baselines), per-finding scores, and VQA by question type."""
    base = metrics.get("baselines", {})
    lines = [f"# LLM-CXR evaluation: {metrics.get('checkpoint', '')}", "", *_protocol(metrics),
             f"{metrics.get('n_images', 0)} evaluation images, {metrics.get('n_vqa', 0)} VQA questions, "
             f"labels by {metrics.get('labels_from', 'the rule-based labeler')}. The paper's numbers are on "
             "MIMIC-CXR with the CheXpert labeler; on another corpus they are context, not targets." +
             _decoding(metrics.get("options")), "",
             "| task | metric | ours | chance baseline | LLM-CXR (paper) | ours - paper | best baseline (paper) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in PAPER_ROWS:
        ours, percent = lookup(metrics, row.path), row.paper.endswith("%")
        cell = (_fmt(ours, percent=percent) + _interval(lookup(metrics, row.path + "_ci"), percent)
                if ours is not None else _missing(metrics, row))
        lines.append(f"| {row.task} | {row.metric} | {cell} | {_fmt(lookup(base, row.path), '-', percent)} | "
                     f"{row.paper or '-'} | {_difference(ours, row.paper)} | {row.best or '-'} |")
    if (metrics.get("protocol") or {}).get("name") == "paper" or lookup(metrics, "image.txv_classifier"):
        lines += _all_findings(metrics)
    else:
        lines += _focus_findings(metrics, base)
    vqa = metrics.get("vqa")
    if vqa:
        lines += ["", "CXR-VQA score by question type (chance: the most frequent answer of the type):", "",
                  "| type | questions | score | chance |", "| --- | --- | --- | --- |"]
        for kind, row in vqa.items():
            lines.append(f"| {kind} | {row['count']} | {_fmt(row['score'])} | "
                         f"{_fmt(lookup(base, f'vqa.{kind}.score'), '-')} |")
    return "\n".join(lines) + "\n"


def _focus_findings(metrics: dict, base: dict) -> list[str]:
    """Label F1 and our classifier's AUROC for the four findings the synthetic corpus draws."""
    per = lookup(metrics, "report.labels.per_class")
    if not per:
        return []
    lines = ["", "CXR->report label F1 by finding (chance: a random report with the reference prevalence); "
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
    return lines


def _all_findings(metrics: dict) -> list[str]:
    """Per CheXpert finding: the report labels' F1, and the txv classifier's AUROC / F1 on the images
    drawn from the reports beside our classifier's ('-': a finding the txv weights do not predict)."""
    per = lookup(metrics, "report.labels.per_class") or {}
    txv = lookup(metrics, "image.txv_classifier.per_class")
    ours = lookup(metrics, "image.classifier.per_class")
    lines = ["", "Per finding (95% bootstrap intervals in brackets); report->CXR scores are of the images drawn "
             f"from the reference reports{'' if txv else '; txv columns missing: ' + TXV_CLASSIFIER_FILL}"
             f"{'' if ours else '; our-classifier columns missing: --classifier DIR'}:", "",
             "| finding | support | CXR->report label F1 | txv AUROC | txv F1 | our classifier AUROC | "
             "our classifier F1 |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in CHEXPERT_LABELS:
        c, t, o = per.get(name) or {}, (txv or {}).get(name) or {}, (ours or {}).get(name) or {}
        support = c.get("support", t.get("support", o.get("support", 0)))
        txv_cells = ("- | -" if t.get("not_predicted") else
                     f"{_with_ci(t, 'auroc') if txv else 'missing'} | {_fmt(t.get('f1')) if txv else 'missing'}")
        lines.append(f"| {name} | {support} | {_with_ci(c, 'f1') if per else 'not run'} | {txv_cells} | "
                     f"{_with_ci(o, 'auroc') if ours else 'missing'} | {_fmt(o.get('f1')) if ours else 'missing'} |")
    return lines


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
