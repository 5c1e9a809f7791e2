"""The token ids `generate` and `evaluate` write beside their text (prompt_ids, generated_ids, image_codes)
equal what the Generator itself built, sampled and encoded, and decode to the text and PNGs written; and
the two switches that decode text as LLM-CXR did (--allow-image-tokens-in-text, --stop-at-end-key-only)
each change decoding on an LM built so they matter, while the defaults do not."""
import csv
import dataclasses
import json

import numpy as np
import pytest
from decoding_helpers import fixed_lm
from generator_helpers import VQ, tiny_lm
from lm_run_helpers import make_setup
from PIL import Image

from llmcxr_jax import checkpoint, cli
from llmcxr_jax.data import mimic_cxr, prompts
from llmcxr_jax.infer import tasks
from llmcxr_jax.models.vqgan import init_vqgan

PNG_STEP = 1 / 127.5  # one uint8 level of a [-1, 1] image: a PNG holds it to half a level


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("ids")
    setup = make_setup(str(d / "setup"), num_images=40, seed=1)
    checkpoint.save_vqgan(str(d / "vqgan"), init_vqgan(VQ, 0))
    corpus = mimic_cxr.load_corpus(setup["root"], progress=False)
    return {"lm": tiny_lm(str(d / "lm"), setup["tokenizer"], 64), "vqgan": str(d / "vqgan"), "root": setup["root"],
            "image": corpus.records[0].image_path,
            "fixed": fixed_lm(str(d / "fixed"), setup["tokenizer"], image_prob=0.3, eos_prob=0.1)}


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _generate(capsys, ckpt, env, out, *args):
    code = cli.main(["generate", "--ckpt", ckpt, "--vqgan", env["vqgan"], "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 0, err
    return _rows(out / "results.jsonl")


def _png_matches_codes(g, png, codes):
    """The PNG is the VQ-GAN's decoding of the codes, to half a uint8 level."""
    made = np.asarray(Image.open(png), np.float32) / 127.5 - 1.0
    drawn = np.clip(g.decode_codes(np.asarray([codes]))[0], -1, 1)
    assert np.abs(made - drawn).max() <= PNG_STEP / 2 + 1e-5


def test_generate_rows_hold_the_generators_own_ids(capsys, env, tmp_path):
    g = tasks.Generator.load(env["lm"], env["vqgan"])
    codes = g.encode_images([env["image"]])[0].tolist()
    sampling = tasks.default_sampling("report", False, 12, g.codes_per_image)
    report = _generate(capsys, env["lm"], env, tmp_path / "r", "--task", "report", "--image", env["image"],
                       "--max-new-tokens", "12", "--seed", "2")[0]
    expected = g.report_results([env["image"]], sampling, 2)
    assert report["prompt_ids"] == g.report_prompts([env["image"]])[0].tolist() == expected.prompt_ids[0]
    assert report["image_codes"] == codes and min(codes) >= 0
    assert report["generated_ids"] == expected.generated_ids[0] and report["output"] == expected.texts[0]
    gen_ids = report["generated_ids"]
    assert len(gen_ids) == 12 or gen_ids[-1] in g.stop_ids  # a stop id ends it, or max_new_tokens did
    assert report["output"] == g.decode(gen_ids) and max(gen_ids) < g.lm.layout.text_size
    vqa = _generate(capsys, env["lm"], env, tmp_path / "q", "--task", "vqa", "--image", env["image"], "--question",
                    "Is there an effusion?", "--max-new-tokens", "6", "--greedy")[0]
    assert vqa["image_codes"] == codes and vqa["output"] == g.decode(vqa["generated_ids"])
    assert vqa["prompt_ids"] == g.encoder.encode(prompts.generation_prompt("Is there an effusion?", "<image>"),
                                                 np.asarray(codes)).tolist()
    assert g.response_of(vqa["generated_ids"]) == g.greedy_responses([np.asarray(vqa["prompt_ids"])], 6)[0]
    text = _generate(capsys, env["lm"], env, tmp_path / "t", "--task", "text", "--text", "Define atelectasis.",
                     "--max-new-tokens", "5")[0]
    assert text["image_codes"] is None and text["output"] == g.decode(text["generated_ids"])
    assert text["prompt_ids"] == g.encoder.encode(prompts.generation_prompt("Define atelectasis.")).tolist()
    image = _generate(capsys, env["lm"], env, tmp_path / "i", "--task", "image", "--report", "Mild edema.",
                      "--seed", "1")[0]
    drawn = g.image(["Mild edema."], tasks.default_sampling("image", False, None, g.codes_per_image), 1)
    assert image["prompt_ids"] == g.image_prompts(["Mild edema."])[0].tolist()
    assert image["image_codes"] == drawn.codes[0].tolist() and len(image["image_codes"]) == 16
    layout, special = g.lm.layout, g.lm.special
    assert image["generated_ids"] == [g.open_id, *(layout.text_size + c for c in image["image_codes"]), g.close_id,
                                      special.end_key_id]
    _png_matches_codes(g, image["output"], image["image_codes"])
    other = [(c + 1) % 64 for c in image["image_codes"]]  # the tolerance can tell other codes apart
    with pytest.raises(AssertionError):
        _png_matches_codes(g, image["output"], other)


def test_retry_rows_hold_the_kept_try(capsys, env, tmp_path):
    """LLM-CXR's retry decoding: generated_ids is the try kept, and its image ids are the codes."""
    g = tasks.Generator.load(env["fixed"], env["vqgan"])
    rows = _generate(capsys, env["fixed"], env, tmp_path, "--task", "image", "--report", "Effusion.",
                     "--image-decoding", "retry", "--max-retries", "80", "--top-p", "1", "--seed", "3")
    row, t = rows[0], g.lm.layout.text_size
    assert row["image_codes"] == [i - t for i in row["generated_ids"] if i >= t] and len(row["image_codes"]) == 16
    assert len(row["generated_ids"]) == 60  # h*w + 44: neither eos (p 0.1 a step) nor anything else ended it
    _png_matches_codes(g, row["output"], row["image_codes"])


def _reports(capsys, env, tmp_path, name, *flags):
    return _generate(capsys, env["fixed"], env, tmp_path / name, "--task", "report", "--inputs",
                     str(tmp_path / "inputs.txt"), "--max-new-tokens", "40", "--top-p", "1", *flags)


def test_departure_flags_change_decoding_and_defaults_do_not(capsys, env, tmp_path):
    """The fixed LM puts 0.3 on image ids and 0.1 on eos at every step. By default no text response
    holds an image id and each one that stops, stops at its first eos. --allow-image-tokens-in-text lets
    image ids in (the text drops them: what the original's decode wrote); --stop-at-end-key-only lets eos
    pass, so responses run to max_new_tokens ("### End" has probability 0)."""
    (tmp_path / "inputs.txt").write_text((env["image"] + "\n") * 6)
    g = tasks.Generator.load(env["fixed"], env["vqgan"])
    t, eos = g.lm.layout.text_size, g.lm.special.eos_id
    default = _reports(capsys, env, tmp_path, "default")
    assert all(max(r["generated_ids"]) < t for r in default)
    assert all(eos not in r["generated_ids"][:-1] for r in default)
    assert sum(r["generated_ids"][-1] == eos for r in default) >= 4  # P(no eos in 40) = 0.9 ** 40 = 1.5%
    images = _reports(capsys, env, tmp_path, "images", "--allow-image-tokens-in-text")
    assert any(any(i >= t for i in r["generated_ids"]) for r in images)  # each row: 3 in 4 before an eos
    assert all(r["output"] == g.decode([i for i in r["generated_ids"] if i < t]) for r in images)
    eos_passes = _reports(capsys, env, tmp_path, "eos", "--stop-at-end-key-only")
    assert all(len(r["generated_ids"]) == 40 for r in eos_passes)
    assert sum(eos in r["generated_ids"] for r in eos_passes) >= 5
    end_key_only = dataclasses.replace(g, stop_at_end_key_only=True)  # its text reads on past an eos
    assert all(max(r["generated_ids"]) < t and r["output"] == end_key_only.decode(r["generated_ids"])
               for r in eos_passes)
    eos_text = g.lm.tokenizer.id_to_token(eos)
    assert all(eos_text not in r["output"] for r in eos_passes)  # by default special tokens leave the text
    kept = _reports(capsys, env, tmp_path, "kept", "--stop-at-end-key-only", "--keep-special-tokens")
    assert [r["generated_ids"] for r in kept] == [r["generated_ids"] for r in eos_passes]  # same seed, same ids
    assert all(r["output"].count(eos_text) == r["generated_ids"].count(eos) for r in kept)  # as LLM-CXR's decode
    assert sum(eos_text in r["output"] for r in kept) >= 5
    both = _reports(capsys, env, tmp_path, "both", "--allow-image-tokens-in-text", "--stop-at-end-key-only")
    assert all(len(r["generated_ids"]) == 40 for r in both)
    share = np.mean([i >= t for r in both for i in r["generated_ids"]])
    assert 0.2 < share < 0.4  # 0.3 expected over 240 ids (sd 0.03): image ids sampled at the LM's rate
    assert all(r["output"] for r in both)  # the text response still decodes to text


def test_evaluate_rows_hold_the_generators_own_ids(capsys, env, tmp_path):
    """reports.jsonl, images.jsonl and vqa.jsonl beside reports.csv / images.csv: the same ids, per
    row, that the Generator builds and samples (the flags reach it through EvalOptions)."""
    code = cli.main(["evaluate", "--ckpt", env["fixed"], "--vqgan", env["vqgan"], "--data", env["root"],
                     "--out", str(tmp_path), "--max-images", "3", "--max-vqa", "2", "--max-new-tokens", "10",
                     "--batch-size", "2", "--grid-images", "0", "--ci-samples", "0", "--text-tokenizer", "simple",
                     "--allow-image-tokens-in-text", "--stop-at-end-key-only"])
    assert code == 0, capsys.readouterr().err
    with open(tmp_path / "reports.csv", newline="") as f:
        table = list(csv.DictReader(f))
    g = tasks.Generator.load(env["fixed"], env["vqgan"], allow_image_tokens_in_text=True, stop_at_end_key_only=True)
    records = mimic_cxr.evaluation_records(mimic_cxr.load_corpus(env["root"], progress=False))[:3]
    paths = [r.image_path for r in records]
    reports = _rows(tmp_path / "reports.jsonl")
    assert [r["dicom_id"] for r in reports] == [r["dicom_id"] for r in table] == [r.dicom_id for r in records]
    assert [r["image_codes"] for r in reports] == g.encode_images(paths).tolist()
    assert [r["prompt_ids"] for r in reports] == [p.tolist() for p in g.report_prompts(paths)]
    assert [g.decode(r["generated_ids"]) for r in reports] == [r["generated"] for r in table]
    assert all(len(r["generated_ids"]) == 10 for r in reports)  # --stop-at-end-key-only reached the generator
    assert any(i >= g.lm.layout.text_size for r in reports for i in r["generated_ids"])  # and the image ids
    images = _rows(tmp_path / "images.jsonl")
    with open(tmp_path / "images.csv", newline="") as f:
        pngs = [row["image"] for row in csv.DictReader(f)]
    assert [r["dicom_id"] for r in images] == [r.dicom_id for r in records]
    for row, png, record in zip(images, pngs, records):
        assert row["prompt_ids"] == g.image_prompts([mimic_cxr.stage_text(record, 2)])[0].tolist()
        _png_matches_codes(g, tmp_path / png, row["image_codes"])
    vqa = _rows(tmp_path / "vqa.jsonl")
    assert len(vqa) == 2
    for row in vqa:
        path = paths[[r.dicom_id for r in records].index(row["dicom_id"])]
        assert row["image_codes"] == g.encode_images([path])[0].tolist()
        assert row["generated"] == g.decode(row["generated_ids"])
        assert row["prompt_ids"] == g.encoder.encode(prompts.generation_prompt(row["question"], "<image>"),
                                                     np.asarray(row["image_codes"])).tolist()
    options = json.loads((tmp_path / "metrics.json").read_text())["options"]
    assert options["allow_image_tokens_in_text"] is True and options["stop_at_end_key_only"] is True


def test_greedy_cli_output_is_the_librarys_greedy_decode(capsys, env, tmp_path):
    """`generate --greedy` writes, for report, text and image, exactly what the library's argmax decoding
    gives for the same prompts: the texts of greedy_responses, and the codes of a greedy Generator.image."""
    g = tasks.Generator.load(env["lm"], env["vqgan"])
    report = _generate(capsys, env["lm"], env, tmp_path / "r", "--task", "report", "--image", env["image"],
                       "--max-new-tokens", "8", "--greedy")[0]
    want = g.greedy_responses(g.report_prompts([env["image"]]), 8)[0]
    assert g.response_of(report["generated_ids"]) == want and report["output"] == g.decode(want)
    text = _generate(capsys, env["lm"], env, tmp_path / "t", "--task", "text", "--text", "List three colours.",
                     "--max-new-tokens", "8", "--greedy")[0]
    prompt = g.encoder.encode(prompts.generation_prompt("List three colours."))
    assert text["prompt_ids"] == list(prompt)
    assert g.response_of(text["generated_ids"]) == g.greedy_responses([np.asarray(prompt)], 8)[0]
    image = _generate(capsys, env["lm"], env, tmp_path / "i", "--task", "image", "--report", "Small effusion.",
                      "--greedy")[0]
    greedy = tasks.default_sampling("image", True, None, g.codes_per_image)
    assert image["image_codes"] == g.image(["Small effusion."], greedy, 7).codes[0].tolist()  # any seed: argmax
