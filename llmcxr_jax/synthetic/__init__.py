"""The synthetic CXR corpus: phantom radiographs (phantom.py), their reports, labels and VQA
(text.py), Dolly-like instruction rows (dolly.py), written by corpus.py in the MIMIC-CXR-JPG
layout so that data/ reads it exactly as it reads the real corpus."""
from llmcxr_jax.synthetic.corpus import (
    LABEL_NOTES,
    LABELS,
    METADATA_COLUMNS,
    Finding,
    plan_corpus,
    render_image,
    sample_anatomy,
    sample_findings,
    synthesize,
)

__all__ = ["LABELS", "LABEL_NOTES", "METADATA_COLUMNS", "Finding", "plan_corpus", "render_image", "sample_anatomy",
           "sample_findings", "synthesize"]
