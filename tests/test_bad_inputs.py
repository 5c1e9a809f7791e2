"""Bad inputs fed to the `llmcxr` command line as a new user would feed them, one table row per
(command, input, outcome): odd but legitimate images are accepted; damaged files (cut, overwritten,
the wrong kind, a pickle that would run code) and out-of-range flags are refused with exit code 2
and one stderr line that names the file and what is wrong. docs/testing.md lists the same table
(`markdown_table`, checked below), so the two cannot drift. Run `python tests/test_bad_inputs.py`
to print the table for the docs."""
import dataclasses
import gzip
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import integrity_helpers
import numpy as np
import pytest
from generator_helpers import VQ, tiny_lm
from lm_helpers import make_tokenizer
from PIL import Image

from llmcxr_jax import checkpoint, cli, synthetic
from llmcxr_jax.convert import diffusers_vqgan
from llmcxr_jax.models.vqgan import init_vqgan

ACCEPTED = "accepted"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "testing.md"


@dataclasses.dataclass(frozen=True)
class Case:
    """One row: `llmcxr COMMAND ARGS...` with {name} filled from the artefacts (and {out}: a new
    directory), and what must happen: ACCEPTED (exit 0), or exit 2 with one stderr line matching
    `says`. `names`: the artefact whose path that line must hold (for an accepted encode-images, a
    line naming the skipped file)."""

    command: str
    given: str  # the input, in words (the docs table's middle column)
    args: tuple[str, ...]
    says: str  # a regex, or ACCEPTED
    names: str | None = None
    needs: str | None = None  # a module the artefact needs (torch), else skipped

    @property
    def id(self) -> str:
        return f"{self.command}:{re.sub(r'[^a-z0-9]+', '-', self.given.lower()).strip('-')}"


def _generate(*args: str) -> tuple[str, ...]:
    return ("--ckpt", "{lm}", "--vqgan", "{vqgan}", "--out", "{out}", "--max-new-tokens", "2", *args)


def _report_from(image: str) -> tuple[str, ...]:
    return _generate("--task", "report", "--image", "{" + image + "}")


CUT = "cut short"
CASES = [
    # ---- images: odd but legitimate ones are read as they are; damaged ones are named
    Case("generate", "a 1x1 PNG as --image", _report_from("one_pixel"), ACCEPTED),
    Case("generate", "an 8x3000 PNG as --image", _report_from("sliver"), ACCEPTED),
    Case("generate", "a 16-bit greyscale PNG as --image", _report_from("grey16"), ACCEPTED),
    Case("generate", "an RGBA PNG as --image", _report_from("rgba"), ACCEPTED),
    Case("generate", "a CMYK JPEG as --image", _report_from("cmyk"), ACCEPTED),
    Case("generate", "a palette PNG as --image", _report_from("palette"), ACCEPTED),
    Case("generate", "a BMP as --image", _report_from("bmp"), ACCEPTED),
    Case("generate", "a TIFF as --image", _report_from("tiff"), ACCEPTED),
    Case("generate", "a JPEG cut in half as --image", _report_from("cut_jpeg"),
         f"image file is truncated .*; the file is {CUT}", "cut_jpeg"),
    Case("generate", "a PNG cut in half as --image", _report_from("cut_png"),
         f"image file is truncated; the file is {CUT}", "cut_png"),
    Case("generate", "a text file named .jpg as --image", _report_from("text_jpeg"),
         "it is not an image file", "text_jpeg"),
    Case("generate", "an empty .png as --image", _report_from("empty_png"), "it is not an image file", "empty_png"),
    Case("encode-images", "a data root with one JPEG cut in half", (
        "--vqgan", "{vqgan}", "--data", "{root_cut_jpeg}", "--out", "{out}", "--batch-size", "8"),
         ACCEPTED, "root_cut_jpeg_file"),
    # ---- reports, --inputs lists and instruction files
    Case("generate", "an empty --report", _generate("--task", "image", "--report", ""), "--task image needs --report"),
    Case("generate", "a binary file as --inputs", _generate("--task", "text", "--inputs", "{binary}"),
         r"is not UTF-8 text: byte 118 of line 2 is 0x80", "binary"),
    Case("generate", "a binary --instructions file",
         _generate("--task", "image", "--report", "Effusion.", "--instructions", "{binary}"),
         "is not UTF-8 text", "binary"),
    Case("generate", "an --inputs file of blank lines", _generate("--task", "image", "--inputs", "{blank}"),
         "has no non-empty line", "blank"),
    Case("generate", "--instructions JSON that is cut short",
         _generate("--task", "image", "--report", "Effusion.", "--instructions", "{cut_json_list}"),
         "is not valid JSON", "cut_json_list"),
    # ---- sampling flags
    Case("generate", "--temperature 0", _generate("--task", "text", "--text", "Hi.", "--temperature", "0"),
         "temperature must be > 0 when sampling"),
    Case("generate", "--temperature nan", _generate("--task", "text", "--text", "Hi.", "--temperature", "nan"),
         "temperature must be > 0 when sampling, got nan"),
    Case("generate", "--top-p 1.5", _generate("--task", "text", "--text", "Hi.", "--top-p", "1.5"),
         r"top_p must be in \(0, 1\]"),
    Case("generate", "--top-k -1", _generate("--task", "text", "--text", "Hi.", "--top-k", "-1"),
         r"top_k must be >= 0 \(0 = off\), got -1"),
    Case("generate", "--max-new-tokens 0", _generate("--task", "text", "--text", "Hi.", "--max-new-tokens", "0"),
         "max_new_tokens must be >= 1, got 0"),
    # ---- the wrong kind of checkpoint
    Case("generate", "a VQ-GAN checkpoint as --ckpt", (
        "--ckpt", "{vqgan}", "--vqgan", "{vqgan}", "--out", "{out}", "--task", "text", "--text", "Hi."),
         "is not a language-model checkpoint", "vqgan"),
    Case("generate", "an LM checkpoint as --vqgan", (
        "--ckpt", "{lm}", "--vqgan", "{lm}", "--out", "{out}", "--task", "text", "--text", "Hi."),
         "is not a VQ-GAN checkpoint", "lm"),
    Case("generate", "a HF model directory as --ckpt", (
        "--ckpt", "{hf}", "--vqgan", "{vqgan}", "--out", "{out}", "--task", "text", "--text", "Hi."),
         "it is a Hugging Face model directory: convert it with .llmcxr import-hf", "hf"),
    Case("export-vqgan", "an LM checkpoint as --ckpt", ("--ckpt", "{lm}", "--format", "taming", "--out", "{out}"),
         "is not a VQ-GAN checkpoint", "lm"),
    Case("generate", "a 3000-word --report",
         _generate("--task", "image", "--report", "effusion " * 3000, "--max-new-tokens", "32"),
         "this model has 512: shorten the report, question or instruction, or lower --max-new-tokens"),
    # ---- damaged orbax checkpoints (verify's exit codes and resume past damage: test_checkpoint_integrity.py,
    # test_lm_signals.py)
    Case("generate", "an LM checkpoint whose array file is cut in half", (
        "--ckpt", "{lm_cut}", "--vqgan", "{vqgan}", "--out", "{out}", "--task", "text", "--text", "Hi."),
         r"checkpoint step 0 in .* is damaged: params\.[\w.]+ cannot be read \(file cut short\?\); no intact step",
         "lm_cut"),
    Case("generate", "an LM checkpoint with one byte flipped in an array file", (
        "--ckpt", "{lm_flip}", "--vqgan", "{vqgan}", "--out", "{out}", "--task", "text", "--text", "Hi."),
         r"checkpoint step 0 in .* is damaged: params\.[\w.]+ fails its checksum; no intact step", "lm_flip"),
    Case("export-hf", "an LM checkpoint whose array file is cut in half", ("--ckpt", "{lm_cut}", "--out", "{out}"),
         r"checkpoint step 0 in .* is damaged: params\.[\w.]+ cannot be read", "lm_cut"),
    # ---- config overrides
    Case("train", "an override of a key the config lacks", (
        "--config", "{stage1}", "--workdir", "{out}", "--config.no_such_key=3"), "config has no key 'no_such_key'"),
    Case("train", "a config file that is not Python", ("--config", "{junk_config}", "--workdir", "{out}"),
         "is not Python that parses at line 2", "junk_config"),
    Case("train", "an override whose value is not a number", (
        "--config", "{stage1}", "--workdir", "{out}", "--config.train.learning_rate=fast"),
         "config key train.learning_rate is a float; got 'fast'"),
    # ---- HF directories (import-hf)
    Case("import-hf", "model.safetensors cut in half", ("--hf", "{hf_cut}", "--out", "{out}"),
         f"is {CUT}: its tensors need \\d+ bytes of data but it holds \\d+", "hf_cut_weights"),
    Case("import-hf", "model.safetensors whose header length is wrong",
         ("--hf", "{hf_header_length}", "--out", "{out}"),
         "is not a safetensors file, or is cut short: its first 8 bytes give a \\d+-byte header",
         "hf_header_length_weights"),
    Case("import-hf", "model.safetensors whose header is not JSON", ("--hf", "{hf_header_json}", "--out", "{out}"),
         "has a damaged header", "hf_header_json_weights"),
    Case("import-hf", "model.safetensors whose offsets pass the end of the file",
         ("--hf", "{hf_offsets}", "--out", "{out}"), f"is {CUT}: its tensors need", "hf_offsets_weights"),
    Case("import-hf", "config.json that is not JSON", ("--hf", "{hf_config_junk}", "--out", "{out}"),
         "is not valid JSON", "hf_config_junk_config"),
    Case("import-hf", "config.json without the model's sizes", ("--hf", "{hf_config_sizes}", "--out", "{out}"),
         "gives no number for hidden_size, num_hidden_layers", "hf_config_sizes_config"),
    Case("import-hf", "a weight index that is not JSON", ("--hf", "{hf_index}", "--out", "{out}"),
         "is not valid JSON", "hf_index_index"),
    Case("import-hf", "tokenizer.json that is not JSON", ("--hf", "{hf_tok_junk}", "--out", "{out}"),
         "is not valid JSON", "hf_tok_junk_tokenizer"),
    Case("import-hf", "tokenizer.json without a model", ("--hf", "{hf_tok_model}", "--out", "{out}"),
         "has no model section", "hf_tok_model_tokenizer"),
    Case("import-hf", "tokenizer.json without BPE merges", ("--hf", "{hf_tok_merges}", "--out", "{out}"),
         "has a BPE model without its vocab and merges", "hf_tok_merges_tokenizer"),
    Case("import-hf", "pytorch_model.bin cut in half (a zip without its end)",
         ("--hf", "{hf_bin_cut}", "--out", "{out}"),
         f"its end \\(the zip's central directory\\) is missing: the file is {CUT}", "hf_bin_cut_weights", "torch"),
    Case("import-hf", "pytorch_model.bin of random bytes", ("--hf", "{hf_bin_junk}", "--out", "{out}"),
         "is neither torch.save's zip archive nor its legacy stream", "hf_bin_junk_weights", "torch"),
    # ---- taming / diffusers VQ-GAN files (import-vqgan)
    Case("import-vqgan", "a taming .ckpt cut in half", ("--taming", "{taming_cut}", "--out", "{out}"),
         f"the file is {CUT}", "taming_cut", "torch"),
    Case("import-vqgan", "a taming .ckpt with one byte of a weight flipped", ("--taming", "{taming_flip}", "--out",
                                                                           "{out}"),
         "the bytes of tensor quantize.embedding.weight .* fail their CRC-32 check", "taming_flip", "torch"),
    Case("import-vqgan", "a legacy (pre-zip) torch.save .ckpt cut short", ("--taming", "{legacy_cut}", "--out",
                                                                          "{out}"),
         f"ends early: the file is {CUT}", "legacy_cut", "torch"),
    Case("import-vqgan", "a .ckpt of random bytes", ("--taming", "{random_bytes}", "--out", "{out}"),
         "is neither torch.save's zip archive nor its legacy stream", "random_bytes", "torch"),
    Case("import-vqgan", "a .ckpt whose pickle would run os.system", ("--taming", "{taming_evil}", "--out", "{out}"),
         r"refusing (posix|nt)\.system: .*nothing in the file was run", "taming_evil", "torch"),
    Case("import-vqgan", "a plain pickle that would run os.system", ("--taming", "{evil_pickle}", "--out", "{out}"),
         r"refusing (posix|nt)\.system: .*nothing in the file was run", "evil_pickle", "torch"),
    Case("import-vqgan", "a taming YAML that does not parse", ("--taming", "{taming_yaml}", "--out", "{out}"),
         "is not valid YAML at line 2", "taming_yaml_config", "torch"),
    Case("import-vqgan", "diffusers weights cut in half", ("--diffusers", "{diffusers_cut}", "--out", "{out}"),
         f"is {CUT}: its tensors need", "diffusers_cut_weights"),
    Case("import-vqgan", "a diffusers config.json that is cut short", ("--diffusers", "{diffusers_json}", "--out",
                                                                      "{out}"),
         "is not valid JSON.*the file ends before the JSON does", "diffusers_json_config"),
    Case("import-vqgan", "a diffusers config.json without the architecture", ("--diffusers", "{diffusers_keys}",
                                                                             "--out", "{out}"),
         "lacks block_out_channels", "diffusers_keys_config"),
    # ---- LLM-CXR codes pickles (import-codes)
    Case("import-codes", "a codes pickle cut in half", ("--pickle", "{codes_cut}", "--out", "{out}"),
         f"it is {CUT} \\(its pickle stops mid-way\\)", "codes_cut"),
    Case("import-codes", "an empty codes pickle", ("--pickle", "{empty_png}", "--out", "{out}"),
         "it is empty", "empty_png"),
    Case("import-codes", "random bytes as a codes pickle", ("--pickle", "{random_bytes}", "--out", "{out}"),
         "it is not a pickle, or its bytes are damaged", "random_bytes"),
    Case("import-codes", "a codes pickle that would run os.system", ("--pickle", "{evil_pickle}", "--out", "{out}"),
         r"refusing (posix|nt)\.system: .*nothing in it was run", "evil_pickle"),
    # ---- MIMIC-CXR-JPG CSVs (encode-images reads the data root first)
    Case("encode-images", "a split CSV without its split column", (
        "--vqgan", "{vqgan}", "--data", "{root_no_column}", "--out", "{out}"),
         r"lacks columns \['split'\] \(found: 'dicom_id', 'study_id', 'subject_id', 'fold'\)", "root_no_column_csv"),
    Case("encode-images", "a metadata CSV of binary bytes", (
        "--vqgan", "{vqgan}", "--data", "{root_binary_csv}", "--out", "{out}"),
         "is not UTF-8 text", "root_binary_csv_csv"),
    Case("encode-images", "a split .csv.gz cut in half", (
        "--vqgan", "{vqgan}", "--data", "{root_cut_gz}", "--out", "{out}"),
         f"is {CUT} \\(Compressed file ended", "root_cut_gz_csv"),
]


# ---------------------------------------------------------------- the artefacts, built once

def _cut(src: Path, dst: Path, keep: float = 0.5) -> str:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return str(dst)


def _images(d: Path, art: dict) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 40, 4), dtype=np.uint8)
    odd = {"one_pixel.png": Image.fromarray(pixels[:1, :1, 0]),
           "sliver.png": Image.fromarray(rng.integers(0, 256, (3000, 8), dtype=np.uint8)),
           "grey16.png": Image.fromarray(rng.integers(0, 65536, (40, 40)).astype(np.uint16)),
           "rgba.png": Image.fromarray(pixels), "cmyk.jpg": Image.fromarray(pixels[..., :3]).convert("CMYK"),
           "palette.png": Image.fromarray(pixels[..., :3]).convert("P"), "bmp.bmp": Image.fromarray(pixels[..., 0]),
           "tiff.tif": Image.fromarray(pixels[..., 0]), "full.jpg": Image.fromarray(pixels[..., :3]),
           "full.png": Image.fromarray(pixels[..., :3])}
    for name, img in odd.items():
        img.save(d / name)
        art[name.split(".")[0]] = str(d / name)
    assert Image.open(art["grey16"]).mode == "I;16" and Image.open(art["cmyk"]).mode == "CMYK"
    art["cut_jpeg"] = _cut(d / "full.jpg", d / "cut.jpg")
    art["cut_png"] = _cut(d / "full.png", d / "cut.png")
    (d / "text.jpg").write_text("a radiology report, not a picture\n")
    art["text_jpeg"] = str(d / "text.jpg")
    (d / "empty.png").write_bytes(b"")
    art["empty_png"] = str(d / "empty.png")


def _text_files(d: Path, art: dict) -> None:
    (d / "binary.txt").write_bytes(bytes(range(256)) * 4)
    art["binary"] = str(d / "binary.txt")
    (d / "blank.txt").write_text("\n   \n\n")
    art["blank"] = str(d / "blank.txt")
    (d / "list.json").write_text('["Draw the CXR.", "Draw')
    art["cut_json_list"] = str(d / "list.json")
    art["random_bytes"] = str(d / "random.ckpt")
    (d / "random.ckpt").write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (d / "junk_config.py").write_text("def get_config(arg):\n    return {{\n")
    art["junk_config"] = str(d / "junk_config.py")
    art["stage1"] = os.path.join(os.path.dirname(__file__), "..", "configs", "llmcxr_stage1.py") + ":tiny"


class _RunsCode:
    """Unpickling it would call os.system (never run here: every reader refuses it by name)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _hf_dirs(d: Path, art: dict, tok_dir: str) -> None:
    """Damaged copies of a small HF directory (config, one-tensor weights, tokenizer): each reader
    stops at its own file, so the weights need not make a whole model."""
    from safetensors.numpy import save_file

    good = d / "hf"
    shutil.copytree(tok_dir, good)
    config = {"model_type": "gpt_neox", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64,
              "layer_norm_eps": 1e-5}
    (good / "config.json").write_text(json.dumps(config))
    save_file({"gpt_neox.embed_in.weight": np.ones((64, 32), np.float32),
               "embed_out.weight": np.ones((64, 32), np.float32)}, str(good / "model.safetensors"))
    art["hf"] = str(good)
    weights = (good / "model.safetensors").read_bytes()
    n = int.from_bytes(weights[:8], "little")

    def damaged(name: str, file: str, data: bytes | str | None, role: str) -> Path:
        out = d / name
        shutil.copytree(good, out)
        if data is not None:
            (out / file).write_bytes(data) if isinstance(data, bytes) else (out / file).write_text(data)
        art[name], art[f"{name}_{role}"] = str(out), str(out / file)
        return out

    damaged("hf_cut", "model.safetensors", weights[: len(weights) // 2], "weights")
    damaged("hf_header_length", "model.safetensors", (10 ** 9).to_bytes(8, "little") + weights[8:], "weights")
    damaged("hf_header_json", "model.safetensors", weights[:8] + b"[" * n + weights[8 + n:], "weights")
    header = json.loads(weights[8:8 + n])
    last = max((e for e in header.values() if "data_offsets" in e), key=lambda e: e["data_offsets"][1])
    last["shape"][0] += 2  # two more rows than the data holds
    last["data_offsets"][1] += 2 * 32 * 4
    raw = json.dumps(header).encode()
    damaged("hf_offsets", "model.safetensors", len(raw).to_bytes(8, "little") + raw + weights[8 + n:], "weights")
    damaged("hf_config_junk", "config.json", "{model_type: gpt_neox}", "config")
    damaged("hf_config_sizes", "config.json", json.dumps({"model_type": "gpt_neox", "vocab_size": 64}), "config")
    damaged("hf_index", "model.safetensors.index.json", '{"weight_map": {"embed_out.weight": ', "index")
    tok = json.loads((good / "tokenizer.json").read_text())
    damaged("hf_tok_junk", "tokenizer.json", "version 1.0\n", "tokenizer")
    damaged("hf_tok_model", "tokenizer.json", json.dumps({k: v for k, v in tok.items() if k != "model"}), "tokenizer")
    no_merges = {**tok, "model": {k: v for k, v in tok["model"].items() if k != "merges"}}
    damaged("hf_tok_merges", "tokenizer.json", json.dumps(no_merges), "tokenizer")
    damaged("hf_bin_junk", "pytorch_model.bin", Path(art["random_bytes"]).read_bytes(), "weights")
    os.remove(Path(art["hf_bin_junk"]) / "model.safetensors")


def _torch_files(d: Path, art: dict) -> None:
    try:
        import torch
    except ImportError:  # the rows that need these files skip
        return
    torch.save({"state_dict": {"quantize.embedding.weight": torch.ones(64, 32)}}, d / "taming.ckpt")
    art["taming_cut"] = _cut(d / "taming.ckpt", d / "taming_cut.ckpt")
    data = bytearray((d / "taming.ckpt").read_bytes())
    data[data.index(np.ones(16, np.float32).tobytes()) + 5] ^= 0x04  # inside the weight's zip record
    (d / "taming_flip.ckpt").write_bytes(bytes(data))
    art["taming_flip"] = str(d / "taming_flip.ckpt")
    torch.save({"state_dict": {"quantize.embedding.weight": torch.ones(64, 32)}}, d / "legacy.ckpt",
               _use_new_zipfile_serialization=False)
    art["legacy_cut"] = _cut(d / "legacy.ckpt", d / "legacy_cut.ckpt", 0.7)
    torch.save({"state_dict": {"w": torch.ones(2)}, "callbacks": {"cb": _RunsCode(art["marker"])}},
               d / "taming_evil.ckpt")
    art["taming_evil"] = str(d / "taming_evil.ckpt")
    shutil.copy(d / "taming.ckpt", d / "taming_yaml.ckpt")
    (d / "taming_yaml.yaml").write_text("model:\n  params: {ddconfig: [1, 2}\n")
    art["taming_yaml"], art["taming_yaml_config"] = str(d / "taming_yaml.ckpt"), str(d / "taming_yaml.yaml")
    out = d / "hf_bin_cut"
    shutil.copytree(art["hf"], out)
    os.remove(out / "model.safetensors")
    torch.save({"gpt_neox.embed_in.weight": torch.ones(64, 32)}, d / "whole.bin")
    _cut(d / "whole.bin", out / "pytorch_model.bin")
    art["hf_bin_cut"], art["hf_bin_cut_weights"] = str(out), str(out / "pytorch_model.bin")


def _vqgan_files(d: Path, art: dict) -> None:
    from safetensors.numpy import save_file

    good = d / "diffusers"
    good.mkdir()
    (good / "config.json").write_text(json.dumps(diffusers_vqgan.diffusers_config(VQ)))
    save_file({"quantize.embedding.weight": np.ones((64, 32), np.float32)}, str(good / diffusers_vqgan.WEIGHTS))
    for name, file, damage in (("diffusers_cut", diffusers_vqgan.WEIGHTS, "weights"),
                               ("diffusers_json", "config.json", "config"),
                               ("diffusers_keys", "config.json", "config")):
        shutil.copytree(good, d / name)
        art[name], art[f"{name}_{damage}"] = str(d / name), str(d / name / file)
    _cut(good / diffusers_vqgan.WEIGHTS, d / "diffusers_cut" / diffusers_vqgan.WEIGHTS)
    _cut(good / "config.json", d / "diffusers_json" / "config.json")
    (d / "diffusers_keys" / "config.json").write_text(json.dumps({"_class_name": "VQModel"}))


def _pickles(d: Path, art: dict) -> None:
    (d / "codes.pickle").write_bytes(pickle.dumps({f"id{i}": list(range(16)) for i in range(20)}))
    art["codes_cut"] = _cut(d / "codes.pickle", d / "codes_cut.pickle")
    (d / "evil.pickle").write_bytes(pickle.dumps({"id0": _RunsCode(art["marker"])}))
    art["evil_pickle"] = str(d / "evil.pickle")


def _data_roots(d: Path, art: dict) -> None:
    good = d / "corpus"
    synthetic.synthesize(str(good), num_images=4, image_size=32, seed=0)

    def root(name: str, csv: str | None) -> Path:
        shutil.copytree(good, d / name)
        art[name] = str(d / name)
        if csv:
            art[f"{name}_csv"] = str(d / name / csv)
        return d / name

    jpeg = sorted((root("root_cut_jpeg", None) / "files").rglob("*.jpg"))[0]
    _cut(jpeg, jpeg)
    art["root_cut_jpeg_file"] = str(jpeg)
    split = root("root_no_column", "mimic-cxr-2.0.0-split.csv") / "mimic-cxr-2.0.0-split.csv"
    lines = split.read_text().split("\n")
    split.write_text("\n".join([lines[0].replace("split", "fold"), *lines[1:]]))
    meta = root("root_binary_csv", "mimic-cxr-2.0.0-metadata.csv") / "mimic-cxr-2.0.0-metadata.csv"
    meta.write_bytes(b"dicom_id,\xff\xfe\x00\x81" * 64)
    gz = root("root_cut_gz", "mimic-cxr-2.0.0-split.csv.gz")
    packed = gzip.compress((gz / "mimic-cxr-2.0.0-split.csv").read_bytes())
    (gz / "mimic-cxr-2.0.0-split.csv").unlink()
    (gz / "mimic-cxr-2.0.0-split.csv.gz").write_bytes(packed[: len(packed) // 2])


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("bad_inputs")
    found: dict[str, str] = {"marker": str(d / "SIDE_EFFECT")}
    tok_dir = str(d / "tokenizer")
    make_tokenizer(tok_dir)
    found["lm"] = tiny_lm(str(d / "lm"), tok_dir, VQ.n_embed)
    checkpoint.save_vqgan(str(d / "vqgan"), init_vqgan(VQ, 0))
    found["vqgan"] = str(d / "vqgan")
    for name, damage in (("lm_cut", integrity_helpers.cut), ("lm_flip", integrity_helpers.flip_silently)):
        shutil.copytree(found["lm"], d / name)
        damage(str(d / name / "0"))
        found[name] = str(d / name)
    for build in (_images, _text_files, _pickles, _data_roots, _vqgan_files):
        build(d, found)
    _hf_dirs(d, found, tok_dir)
    _torch_files(d, found)
    return found


# ---------------------------------------------------------------- the table, run

@pytest.fixture(scope="module", autouse=True)
def _one_generator_per_model():
    """The generate rows run one LM and VQ-GAN many times: each distinct load (and its compiled
    decoder) is kept for the module. A load that fails is not kept, so every refused checkpoint is
    still read by its own row."""
    from llmcxr_jax.infer import tasks

    real, kept = tasks.Generator.load.__func__, {}

    def load(cls, *args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in kept:
            kept[key] = real(cls, *args, **kwargs)
        return kept[key]

    patch = pytest.MonkeyPatch()
    patch.setattr(tasks.Generator, "load", classmethod(load))
    yield
    patch.undo()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, art, tmp_path, capsys):
    if case.needs:
        pytest.importorskip(case.needs)
    fill = {**art, "out": str(tmp_path / "out")}
    code = cli.main([case.command, *(a.format(**fill) for a in case.args)])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    if case.says == ACCEPTED:
        assert code == 0, err
        if case.names:  # a skipped file is named, not fatal
            assert any(art[case.names] in line for line in lines), err
    else:
        assert code == 2 and out == "", err
        assert len(lines) == 1, err  # one line, no traceback, no progress bar
        assert lines[0].startswith(f"llmcxr {case.command}: error: "), err
        assert re.search(case.says, lines[0]), lines[0]
        if case.names:
            assert art[case.names] in lines[0], lines[0]
    assert not os.path.exists(art["marker"])  # nothing in a refused pickle ran


def test_the_safetensors_check_passes_every_file_safetensors_writes(tmp_path):
    """No false alarm: scalars, empty tensors, every numpy dtype safetensors stores, metadata, and no tensors."""
    from safetensors.numpy import load_file, save_file

    from llmcxr_jax import user_files

    arrays = {"scalar": np.array(3.0, np.float32), "empty": np.zeros((0, 5), np.float16),
              **{f"t_{dt}": np.arange(6).astype(dt).reshape(2, 3) for dt in ("float64", "float32", "float16", "int64",
                                                                           "int32", "int16", "int8", "uint8", "bool")}}
    for name, tensors, meta in (("all", arrays, {"format": "pt"}), ("none", {}, None)):
        save_file(tensors, str(tmp_path / name), metadata=meta)
        header = user_files.check_safetensors(str(tmp_path / name), "test file")
        assert set(header) == set(tensors) == set(load_file(str(tmp_path / name)))


def test_the_table_covers_every_kind_of_input():
    """Each kind the issue lists has a row; every row's id is its own."""
    ids = [c.id for c in CASES]
    assert len(set(ids)) == len(ids)
    kinds = ("1x1", "8x3000", "16-bit", "RGBA", "CMYK", "palette", "BMP", "TIFF", "cut in half as --image",
             "empty --report", "--temperature", "VQ-GAN checkpoint as --ckpt", "override", "safetensors",
             "tokenizer.json", "pytorch_model.bin", "taming", "would run os.system", "one JPEG cut in half",
             "binary file as --inputs", "config.json", "CSV", "codes pickle")
    assert all(any(k in c.given for c in CASES) for k in kinds), [k for k in kinds if not any(k in c.given
                                                                                              for c in CASES)]


def markdown_table() -> str:
    """The table as docs/testing.md lists it: command, input, outcome (the regex the line must match)."""
    rows = ["| command | input | outcome |", "| --- | --- | --- |"]
    for c in CASES:
        outcome = "accepted" + (" (the skipped file is named)" if c.names else "") if c.says == ACCEPTED else \
            f"exit 2, one line: `{c.says}`".replace("|", "\\|")
        rows.append(f"| `{c.command}` | {c.given} | {outcome} |")
    return "\n".join(rows) + "\n"


def test_docs_list_the_table():
    assert markdown_table() in DOCS.read_text(), "docs/testing.md's bad-input table is stale; paste the output of " \
        "`python tests/test_bad_inputs.py` into its Bad inputs section"


if __name__ == "__main__":
    print(markdown_table(), end="")
