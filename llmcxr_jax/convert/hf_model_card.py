"""What turns an HF export into something transformers can use on its own: generation_config.json
(LLM-CXR's report sampling, stopping at eos and "### End") and a README.md model card written
from the checkpoint's own facts (vocabulary layout, prompt format, image decoding, data terms).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any

from llmcxr_jax.vocab import END_KEY, INSTRUCTION_KEY, RESPONSE_KEY, SpecialTokens

# LLM-CXR's report settings. infer/sampling.py and infer/tasks.py hold the same numbers for our own
# sampler; convert/ sits below infer/ in the import layers, so tests/test_export_card.py checks they agree.
REPORT_SAMPLING: dict[str, Any] = {"do_sample": True, "temperature": 1.0, "top_p": 0.92, "top_k": 0,
                                   "max_new_tokens": 128}
IMAGE_MAX_NEW_TOKENS = 300  # what LLM-CXR allows an image response (256 codes plus the delimiters)
# The Dolly template's first line and the image marker, as data/prompts.py writes them (a test checks).
INTRO_BLURB = ("Below is an instruction that describes a task. "
               "Write a response that appropriately completes the request.")
IMAGE_MARKER = "<image>"
REPORT_INSTRUCTION = "Write the radiology report for this chest X-ray."
TAGS = ("gpt_neox", "chest-x-ray", "llm-cxr", "radiology", "llmcxr-jax")
GENERATION_CONFIG, MODEL_CARD = "generation_config.json", "README.md"
RESPONSE_SHOWN = RESPONSE_KEY.replace("\n", "\\n")  # the key as Markdown shows it: ### Response:\n


@dataclasses.dataclass(frozen=True)
class ExportFacts:
    """What the card states about one export, every field read from the checkpoint being exported."""

    text_size: int  # T = len(tokenizer); text ids are 0..T-1
    image_codes: int  # K; image code c is id T + c
    table_rows: int  # rows the checkpoint stores (T + K padded); the export keeps T + K
    hidden_size: int
    num_layers: int
    num_heads: int
    parameters: int  # in the exported tensors
    dtype: str
    weight_files: tuple[str, ...]
    special: SpecialTokens | None
    has_tokenizer: bool
    image_marker: tuple[int, ...] | None  # ids of "<", "image", ">" when the tokenizer splits "<image>" so
    config_eos: int | list[int] | None = None  # config.json's ids: all a bare LM can say about stopping
    config_pad: int | None = None

    @property
    def vocab_size(self) -> int:
        return self.text_size + self.image_codes


def image_marker(tokenizer) -> tuple[int, ...] | None:
    """The ids of "<image>" when they are the three tokens LLM-CXR's image injection needs."""
    if tokenizer is None:
        return None
    if tokenizer.truncation is not None or tokenizer.padding is not None:
        tokenizer = copy.deepcopy(tokenizer)  # padding or truncation would change the count
        tokenizer.no_truncation()
        tokenizer.no_padding()
    ids = tuple(int(i) for i in tokenizer.encode(IMAGE_MARKER).ids)
    return ids if len(ids) == 3 else None


def generation_config(facts: ExportFacts) -> dict[str, Any]:
    """generation_config.json: LLM-CXR's report sampling; rows stop at eos or "### End" and pad with pad.

    Without special-token ids (a bare LM) only config.json's eos / pad are known, if it has them."""
    out: dict[str, Any] = dict(REPORT_SAMPLING)
    if facts.special is not None:
        out["eos_token_id"] = [facts.special.eos_id, facts.special.end_key_id]
        out["pad_token_id"] = facts.special.pad_id
    else:
        if facts.config_eos is not None:
            out["eos_token_id"] = facts.config_eos
        if facts.config_pad is not None:
            out["pad_token_id"] = facts.config_pad
    return out


def write(out_dir: str, facts: ExportFacts) -> None:
    """generation_config.json and README.md into an export directory."""
    with open(os.path.join(out_dir, GENERATION_CONFIG), "w") as f:
        json.dump(generation_config(facts), f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(out_dir, MODEL_CARD), "w", encoding="utf-8") as f:
        f.write(model_card(facts))


# ---------------------------------------------------------------- the card


def template() -> str:
    """The Dolly training text, as LLM-CXR trains on it, with {instruction}, {input} and {response} fields."""
    return (f"{INTRO_BLURB}\n\n{INSTRUCTION_KEY}\n{{instruction}}\n\nInput:\n{{input}}\n\n{RESPONSE_KEY}"
            f"{{response}}\n\n{END_KEY}")


def model_card(facts: ExportFacts) -> str:
    parts = [_front_matter(), _summary(facts), _vocabulary(facts), _prompt(facts), _generation(facts)]
    if facts.image_codes:
        parts.append(_image_decoding(facts))
    parts += [_data_terms(), _provenance(facts)]
    return "\n".join(parts)


def _front_matter() -> str:
    tags = "\n".join(f"  - {t}" for t in TAGS)
    return ("---\n"
            "# license: the exporter cannot know it; set it to the terms you release these weights under\n"
            "license: other\n"
            "library_name: transformers\n"
            "pipeline_tag: text-generation\n"
            f"tags:\n{tags}\n"
            "---\n")


def _files(facts: ExportFacts) -> str:
    files = list(facts.weight_files)  # weight files and their indexes, as written
    files += ["config.json", GENERATION_CONFIG]
    if facts.has_tokenizer:
        files += ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    return ", ".join(f"`{f}`" for f in files + [MODEL_CARD])


def _weight_formats(facts: ExportFacts) -> str:
    """Which stacks read which weight files: the .bin files are for those without safetensors."""
    has_bin = any(f.endswith(".bin") for f in facts.weight_files)
    has_st = any(f.endswith(".safetensors") for f in facts.weight_files)
    if has_bin and has_st:
        return ("- Weights are in both formats, the same tensors: transformers reads the `.safetensors` files when "
                "the safetensors package is installed, else the `.bin` files (plain tensors, "
                "`torch.load(weights_only=True)` reads them).\n")
    if has_bin:
        return ("- Weights are `pytorch_model*.bin` files of plain tensors (`torch.load(weights_only=True)` reads "
                "them), for stacks without the safetensors package such as LLM-CXR's transformers 4.28.1.\n")
    return ""


def _summary(facts: ExportFacts) -> str:
    if facts.image_codes:
        recorded = (f"`vocab_size` = T + K = {facts.vocab_size} and `llmcxr_image_codes` = K = {facts.image_codes}; "
                    "`llmcxr import-hf` reads K back from it")
    else:
        recorded = f"`vocab_size` = T = {facts.vocab_size}; there are no image rows (K = 0)"
    return (
        "# LLM-CXR language model (GPT-NeoX), exported by llmcxr-jax\n\n"
        "A GPT-NeoX causal language model in the layout of LLM-CXR (ICLR 2024, arXiv 2305.11490): text tokens "
        "followed by one token per VQ-GAN code, so that one instruction-tuned LM reads chest X-rays (CXR -> "
        "report, visual question answering) and writes them (report -> CXR). `llmcxr export-hf` wrote this "
        "directory from an llmcxr-jax checkpoint and generated this card from that checkpoint's facts; it "
        "cannot tell how well the weights were trained.\n\n"
        f"- Architecture: `GPTNeoXForCausalLM`, hidden size {facts.hidden_size}, {facts.num_layers} layers, "
        f"{facts.num_heads} heads, {facts.parameters:,} parameters, stored as {facts.dtype}.\n"
        f"- Files: {_files(facts)}.\n"
        f"{_weight_formats(facts)}"
        f"- `config.json` records {recorded}.\n")


def _vocabulary(facts: ExportFacts) -> str:
    t, k = facts.text_size, facts.image_codes
    lines = ["## Vocabulary\n",
             "| ids | what |", "| --- | --- |",
             f"| 0 .. {t - 1} | text tokens: T = {t}, the tokenizer's length (`len(tokenizer)`) |"]
    if k:
        lines.append(f"| {t} .. {t + k - 1} | image tokens: K = {k} VQ-GAN codes; code c is id T + c = {t} + c |")
    lines.append("")
    if k:
        lines.append("Image tokens have no tokenizer entries: put them into, and take them out of, the id "
                     "sequence yourself (below).")
    else:
        lines.append("This export has no image-token rows (K = 0): it reads and writes text only.")
    padding = facts.table_rows - facts.vocab_size
    lines.append(f"The checkpoint stored a table of {facts.table_rows} rows (T + K padded to a multiple of 128 "
                 f"for sharding); the export sliced the {padding} padding rows away, so the embedding and the "
                 f"output head here have exactly T + K = {facts.vocab_size} rows.\n")
    s = facts.special
    if s is not None:
        lines += ["Special tokens of this export:\n",
                  "| token | id |", "| --- | --- |",
                  f"| eos | {s.eos_id} |", f"| pad | {s.pad_id} |",
                  f"| `{END_KEY}` | {s.end_key_id} |", f"| `{INSTRUCTION_KEY}` | {s.instruction_key_id} |",
                  f"| `{RESPONSE_SHOWN}` | {s.response_key_id} |",
                  ""]
    else:
        lines.append("The checkpoint recorded no special-token ids (a bare LM), so this card cannot name the ids "
                     f"of eos and `{END_KEY}`.\n")
    return "\n".join(lines)


def _prompt(facts: ExportFacts) -> str:
    text = ("## Prompt format\n\n"
            "LLM-CXR trains on Dolly-style text, byte for byte:\n\n"
            f"```\n{template()}\n```\n\n"
            "Without an input the `Input:` block (its line and the blank line after it) is left out. A "
            f"generation prompt ends right after `{RESPONSE_SHOWN}`; the model writes the response and then "
            f"`{END_KEY}`.\n")
    if not facts.image_codes:
        return text
    marker = facts.image_marker
    where = (f" (ids {marker[0]}, {marker[1]}, {marker[2]} in this tokenizer)" if marker else "")
    return text + (
        f"\nAn image is written as the text `{IMAGE_MARKER}`, which the tokenizer splits into three tokens "
        f"`<`, `image`, `>`{where}; the middle token is replaced by the image's h x w tokens "
        "(T + code, codes in row-major order of the VQ-GAN's latent grid), so the image sits between `<` and "
        "`>`. There are no other image delimiters. The image is the input for CXR -> report and for "
        "questions about an image; for report -> CXR the report is the input and the response is `<`, the "
        "h x w image tokens, `>`.\n")


def _generation(facts: ExportFacts) -> str:
    s = facts.special
    cfg = generation_config(facts)
    settings = ", ".join(f"`{k}` {json.dumps(v)}" for k, v in sorted(cfg.items()))
    head = ("## Generation\n\n"
            f"`{GENERATION_CONFIG}` holds LLM-CXR's report settings, so `model.generate(ids)` needs no "
            f"arguments: {settings}. Arguments to `generate` override it.")
    if s is not None:
        head += (f" Rows stop at eos ({s.eos_id}) or `{END_KEY}` ({s.end_key_id}); the output keeps the stop "
                 "token.")
    else:
        head += (" This export has no special-token ids, so the file cannot name the stop tokens (at most "
                 "config.json's eos): pass them, "
                 f"`model.generate(ids, eos_token_id=[EOS_ID, END_ID], pad_token_id=EOS_ID)` with the ids of eos "
                 f"and `{END_KEY}` in the tokenizer the model was trained with; otherwise a response runs past "
                 f"`{END_KEY}` to `max_new_tokens`.")
    t, k = facts.text_size, facts.image_codes
    if k:
        notes = ["- `generate` samples over all T + K ids, as LLM-CXR did. For text answers you may pass "
                 f"`suppress_tokens=list(range({t}, {t + k}))` to rule image tokens out (what `llmcxr generate` "
                 "does in its text tasks).",
                 f"- LLM-CXR generates images with `max_new_tokens={IMAGE_MAX_NEW_TOKENS}` and samples again "
                 "until exactly h x w image tokens come out; `llmcxr generate --task image` instead constrains "
                 "the response to `<`, h x w image tokens, `>`."]
    else:
        notes = ["- `generate` samples over all ids, as LLM-CXR did."]
    notes.append("- `do_sample=False` gives the greedy response; llmcxr-jax's tests check that it equals "
                 "llmcxr-jax's greedy decoding token for token.")
    text = head + "\n\n" + "\n".join(notes) + "\n"
    if s is not None and facts.has_tokenizer and k and facts.image_marker is not None:
        text += _report_snippet(facts)
    return text


def _report_snippet(facts: ExportFacts) -> str:
    t, k = facts.text_size, facts.image_codes
    return (
        "\nCXR -> report, with the image's VQ-GAN codes already at hand (`llmcxr encode-images` writes them):\n\n"
        "```python\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        "export_dir = \".\"  # this directory\n"
        "codes = [...]  # the image's h*w VQ-GAN codes, row-major\n"
        f"T, K = {t}, {k}\n"
        "tokenizer = AutoTokenizer.from_pretrained(export_dir)\n"
        "model = AutoModelForCausalLM.from_pretrained(export_dir)\n"
        f"instruction = \"{REPORT_INSTRUCTION}\"\n"
        f"prompt = (\"{INTRO_BLURB}\"\n"
        f"          f\"\\n\\n### Instruction:\\n{{instruction}}\\n\\nInput:\\n{IMAGE_MARKER}\\n\\n"
        "### Response:\\n\")\n"
        "ids = tokenizer(prompt).input_ids\n"
        f"marker = tokenizer(\"{IMAGE_MARKER}\").input_ids  # \"<\", \"image\", \">\"\n"
        "at = next(i for i in range(len(ids)) if ids[i:i + 3] == marker)\n"
        "ids = ids[:at + 1] + [T + c for c in codes] + ids[at + 2:]  # the image between \"<\" and \">\"\n"
        "out = model.generate(torch.tensor([ids]))\n"
        "report = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()\n"
        "```\n")


def _image_decoding(facts: ExportFacts) -> str:
    t, k = facts.text_size, facts.image_codes
    return (
        "## Decoding image tokens\n\n"
        "The image tokens of a response are VQ-GAN codes: subtract T, lay the h x w codes out row-major on the "
        "latent grid, look each up in the codebook and run the decoder on those vectors as they are (no second "
        "quantisation). With the VQ-GAN this model's codes came from, exported by "
        "`llmcxr export-vqgan --format diffusers` (a diffusers `VQModel` with "
        f"`num_vq_embeddings` = K = {k}):\n\n"
        "```python\n"
        "import torch\n"
        "from diffusers import VQModel\n\n"
        "vqgan_dir = \"VQGAN_DIR\"  # written by llmcxr export-vqgan --format diffusers\n"
        f"T, K = {t}, {k}\n"
        "# response: the ids generate() returned after a report -> CXR prompt, out[0, len(ids):].tolist()\n"
        "codes = torch.tensor([i - T for i in response if T <= i < T + K])\n"
        "vqgan = VQModel.from_pretrained(vqgan_dir).eval()\n"
        "h = w = vqgan.config.sample_size // 2 ** (len(vqgan.config.block_out_channels) - 1)  # LLM-CXR: 16\n"
        "if codes.numel() != h * w:\n"
        "    raise ValueError(f\"{codes.numel()} image tokens, not {h * w}: sample again, as LLM-CXR does\")\n"
        "with torch.no_grad():\n"
        "    z = vqgan.quantize.embedding(codes).reshape(1, h, w, -1).permute(0, 3, 1, 2)  # [1, dim, h, w]\n"
        "    pixels = vqgan.decode(z, force_not_quantize=True).sample  # [1, 3, H, W], about [-1, 1]\n"
        "image = ((pixels[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()\n"
        "```\n\n"
        "LLM-CXR's VQ-GAN reads 256 x 256 images into a 16 x 16 grid (256 codes) from a codebook of 1024.\n")


def _data_terms() -> str:
    return (
        "## Training data and terms of use\n\n"
        "LLM-CXR is trained on MIMIC-CXR-JPG (images) and MIMIC-CXR (reports). They are credentialed-access "
        "data on PhysioNet: using them needs a credentialed PhysioNet account, the required human-subjects "
        "training and a signed data use agreement. A model trained on them is derived from that data and "
        "falls under that agreement too. In practice: do not use it to try to identify anyone, and do not make it "
        "available to people the agreement does not cover; a public upload may not be allowed. If these "
        "weights were trained on MIMIC-CXR, read the agreement for the release you have in mind and ask "
        "PhysioNet when in doubt. This card is not legal advice.\n\n"
        "The exporter does not know which data trained these weights (llmcxr-jax also trains on a synthetic "
        "corpus) nor under which license you release them; `license: other` above says only that. Name "
        "the training data and the license here, and mind the base model's own license (dolly-v2-3b: MIT; "
        "Pythia: Apache-2.0).\n\n"
        "Not for clinical use: reports and images written by this model can be wrong and must not guide "
        "diagnosis or treatment.\n")


def _provenance(facts: ExportFacts) -> str:
    if facts.image_codes:
        back = "`llmcxr import-hf --hf DIR --out CKPT` (K comes from `config.json`)"
    else:
        back = "`llmcxr import-hf --hf DIR --out CKPT --image-codes K` (the image rows to add)"
    return ("## How it was made\n\n"
            "Exported by `llmcxr export-hf` (llmcxr-jax, a JAX/Flax reimplementation of LLM-CXR). Import it back "
            f"with {back}.\n")
