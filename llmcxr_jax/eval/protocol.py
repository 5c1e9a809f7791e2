"""`llmcxr evaluate --protocol paper`: the settings LLM-CXR's evaluation used (its evaluation list, impression
text, top_p 0.92 / top_k 0 / temperature 1 sampling, every report and image metric), the check that refuses
options that would contradict them, the inputs whose absence leaves table cells empty, and the paragraph of
metrics.md that says what ran and where it departs from the paper.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

from llmcxr_jax.errors import UsageError
from llmcxr_jax.eval import report_metrics
from llmcxr_jax.infer.sampling import LLMCXR_TEMPERATURE, LLMCXR_TOP_K, LLMCXR_TOP_P
from llmcxr_jax.infer.tasks import REPORT_TOKENS

PROTOCOLS = ("", "paper")  # "": the options as given
PAPER_EVAL_IMAGES = 3530  # the paper's evaluation set: PA/AP images of validate + test
EVAL_LIST_FILE = "eval_dicom_ids.pickle"  # LLM-CXR's list; looked for in the data root when --eval-list is not given

# EvalOptions field -> (is the value the paper's?, the flag that set it, what the paper does)
_PAPER = {
    "tasks": (lambda v: set(v) == {"report", "image", "vqa"}, "--tasks", "scores all three tasks"),
    "report_part": (lambda v: v == "impression", "--report-part", "compares against the impression"),
    "greedy": (lambda v: not v, "--greedy", f"samples (top_p {LLMCXR_TOP_P}, top_k {LLMCXR_TOP_K})"),
    "temperature": (lambda v: v == LLMCXR_TEMPERATURE, "--temperature",
                    f"samples at temperature {LLMCXR_TEMPERATURE:g}"),
    "image_temperature": (lambda v: v in (None, LLMCXR_TEMPERATURE), "--image-temperature",
                          f"draws at temperature {LLMCXR_TEMPERATURE:g}"),
    "top_p": (lambda v: v == LLMCXR_TOP_P, "--top-p", f"samples with top_p {LLMCXR_TOP_P}"),
    "top_k": (lambda v: v == LLMCXR_TOP_K, "--top-k", f"samples with top_k {LLMCXR_TOP_K} (off)"),
    "max_new_tokens": (lambda v: v in (0, REPORT_TOKENS), "--max-new-tokens", f"allows {REPORT_TOKENS} new tokens"),
    "text_tokenizer": (lambda v: v == "ptb", "--text-tokenizer", "scores text on the COCO toolkit's PTB tokens"),
    "ci_samples": (lambda v: v > 0, "--ci-samples", "is read here with bootstrap intervals"),
}


def check_paper(opts) -> None:
    """Refuse, in one line, an option whose value contradicts the paper's protocol (EvalOptions'
    defaults are the paper's values, so only an explicit, different value is refused). METEOR, off
    by default, the protocol turns on (EvalOptions)."""
    for field, (is_paper, flag, what) in _PAPER.items():
        value = getattr(opts, field)
        if not is_paper(value):
            shown = "" if isinstance(value, bool) else " " + (",".join(value) if isinstance(value, tuple)
                                                              else str(value))
            raise UsageError(f"--protocol paper {what}; {flag}{shown} contradicts it: leave out {flag} or "
                             "--protocol paper")


def paper_eval_list(opts, data: str) -> str:
    """The evaluation list the paper protocol reads: --eval-list, else LLM-CXR's EVAL_LIST_FILE in the
    data root when it is there, else "" (the selection is rebuilt from the metadata)."""
    if opts.eval_list:
        return opts.eval_list
    found = os.path.join(data, EVAL_LIST_FILE)
    return found if os.path.isfile(found) else ""


def missing_inputs(opts, txv_is_classifier: bool | None) -> list[tuple[str, str]]:
    """(table cells, what fills them) for each paper metric this run cannot compute. txv_is_classifier:
    whether --txv-weights holds the whole classifier (None: no file given)."""
    missing = []
    if not opts.txv_weights:
        missing.append(("txv classifier AUROC / F1 and FID on txv features",
                        "--txv-weights FILE (the torchxrayvision classifier, converted whole)"))
    elif not txv_is_classifier:
        missing.append(("txv classifier AUROC / F1",
                        f"--txv-weights {opts.txv_weights} holds the DenseNet's features only; convert the whole "
                        "classifier"))
    if not opts.inception_weights:
        missing.append(("FID on Inception features", "--inception-weights FILE (torch-fidelity's FID Inception)"))
    why = report_metrics.meteor_unavailable()
    if why:
        missing.append(("METEOR", why))
    return missing


def require(missing: Sequence[tuple[str, str]]) -> None:
    """--require-all-metrics: a missing paper metric is an error before anything is generated."""
    if missing:
        cells, fill = missing[0]
        more = f" (and {len(missing) - 1} more: {', '.join(c for c, _ in missing[1:])})" if len(missing) > 1 else ""
        raise UsageError(f"--require-all-metrics: {cells} cannot be computed: {fill}{more}")


def describe(opts, selection: dict, missing: Sequence[tuple[str, str]] = ()) -> dict:
    """metrics.json's "protocol": its name, the selection, and under "paper" the departures from the
    paper and the missing inputs (missing_inputs), for metrics.md."""
    if opts.protocol != "paper":
        return {"name": opts.protocol or "as given", "selection": selection}
    departures = []
    if not (opts.reference_labels and opts.generated_labels):
        departures.append("labels by our rule-based CheXpert-style labeler, not the CheXpert labeler (label "
                          "OUT/reference_reports.csv and OUT/generated_reports.csv with it, then rerun with "
                          "--reference-labels / --generated-labels)")
    if not selection.get("eval_list"):
        departures.append(f"the selection is rebuilt from the metadata ({selection.get('n', 0)} images; the paper "
                          f"lists {PAPER_EVAL_IMAGES}: give its {EVAL_LIST_FILE} as --eval-list)")
    if opts.max_images or opts.max_vqa:
        departures.append("a subset only (--max-images / --max-vqa)")
    if opts.image_decoding != "retry":
        departures.append("images are drawn constrained to exactly h*w image tokens (LLM-CXR sampled freely and "
                          "retried: --image-decoding retry)")
    if not (opts.report_instructions and opts.image_instructions):
        departures.append("our first instruction paraphrase for every input (LLM-CXR drew one of its ten: "
                          "--instructions DIR from `llmcxr extract-instructions`)")
    if opts.dtype != "bfloat16":
        departures.append(f"the LM computes in {opts.dtype} (LLM-CXR generated in bfloat16: --dtype bfloat16)")
    if not (opts.allow_image_tokens_in_text and opts.stop_at_end_key_only and opts.keep_special_tokens):
        departures.append("text decoding keeps our departures (LLM-CXR's: --allow-image-tokens-in-text "
                          "--stop-at-end-key-only --keep-special-tokens)")
    return {"name": "paper", "selection": selection, "departures": departures,
            "missing": [list(m) for m in missing]}
