"""The demo's ten phases, in order: what each makes, the `llmcxr` command a user would run for it,
and the module that does the work. pipeline.py runs them, summary.py lists them, and docs/layout.md's
code map is this table."""
from __future__ import annotations

from typing import NamedTuple


class Phase(NamedTuple):
    name: str
    what: str
    command: str     # the command that does the same outside the demo
    module: str      # where the work lives


PHASES: tuple[Phase, ...] = (
    Phase("corpus", "synthetic CXR corpus (llmcxr synth)", "llmcxr synth", "synthetic/corpus.py"),
    Phase("vqgan", "train the VQ-GAN (llmcxr train-vqgan)", "llmcxr train-vqgan", "train/vqgan.py"),
    Phase("codes", "encode every image (llmcxr encode-images)", "llmcxr encode-images", "data/encode.py"),
    Phase("tokenizer", "BPE tokenizer on the corpus text, saved as a HF tokenizer", "(demo only)",
          "data/text_tokenizer.py"),
    Phase("classifier", "CXR classifier that scores report->CXR images", "(demo only)", "eval/cxr_classifier.py"),
    Phase("stage1", "LM stage 1 (llmcxr train, llmcxr_stage1)", "llmcxr train", "train/lm.py"),
    Phase("stage2", "LM stage 2 from stage 1 (llmcxr train, llmcxr_stage2)", "llmcxr train", "train/lm.py"),
    Phase("evaluate", "score the model (llmcxr evaluate)", "llmcxr evaluate", "eval/evaluate.py"),
    Phase("export", "export LM to HF, VQ-GAN to diffusers and taming (export-hf, export-vqgan)",
          "llmcxr export-hf, export-vqgan", "convert/hf_gpt_neox.py, convert/diffusers_vqgan.py, "
          "convert/taming_vqgan.py"),
    Phase("pytorch", "reload the exports in transformers / diffusers and compare with JAX", "(demo only)",
          "convert/torch_reload.py"),
)
NAMES = tuple(p.name for p in PHASES)


def code_map() -> str:
    """docs/layout.md's code map: each phase -> the command -> the module, as a Markdown table."""
    rows = ["| demo phase | what it makes | the command outside the demo | module doing the work (llmcxr_jax/) |",
            "| --- | --- | --- | --- |"]
    for i, p in enumerate(PHASES, 1):
        command = f"`{p.command}`" if p.command.startswith("llmcxr") else p.command
        modules = ", ".join(f"`{m.strip()}`" for m in p.module.split(","))
        rows.append(f"| {i}. {p.name} | {p.what} | {command} | {modules} |")
    return "\n".join(rows)
