"""`llmcxr generate` on a tiny random LM and VQ-GAN: every task runs end to end, image responses
always carry exactly h*w codes, instructions from a file are drawn per input with the seed and
recorded, LLM-CXR's retry decoding records its retries and fails clearly at the cap, bfloat16 and the
text clean-up reach the command, and bad input fails in one line."""
import json

import numpy as np
import pytest
from decoding_helpers import fixed_lm
from generator_helpers import VQ
from generator_helpers import tiny_lm as _lm
from lm_run_helpers import make_setup

from llmcxr_jax import checkpoint, cli
from llmcxr_jax.models.vqgan import VQGANConfig, init_vqgan


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    setup = make_setup(str(d / "setup"), num_images=12)
    checkpoint.save_vqgan(str(d / "vqgan"), init_vqgan(VQ, 0))
    from llmcxr_jax.data import mimic_cxr
    image = mimic_cxr.load_corpus(setup["root"], progress=False).records[0].image_path
    return {"lm": _lm(str(d / "lm"), setup["tokenizer"], 64), "lm0": _lm(str(d / "lm0"), setup["tokenizer"], 0),
            "vqgan": str(d / "vqgan"), "image": image, "dir": d,
            "fixed": fixed_lm(str(d / "fixed"), setup["tokenizer"])}


def _run(capsys, env, *args):
    code = cli.main(["generate", "--ckpt", env["lm"], "--vqgan", env["vqgan"], *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_every_task_runs(capsys, env, tmp_path):
    code, out, err = _run(capsys, env, "--task", "report", "--image", env["image"], "--out", str(tmp_path / "r"),
                          "--max-new-tokens", "12")
    assert code == 0, err
    assert isinstance(json.loads(out.splitlines()[-1])["results"][0]["output"], str)
    code, out, err = _run(capsys, env, "--task", "image", "--report", "Small left pleural effusion.",
                          "--out", str(tmp_path / "i"))
    assert code == 0, err
    png = json.loads(out.splitlines()[-1])["results"][0]["output"]
    from PIL import Image
    assert Image.open(png).size == (32, 32)
    code, _, err = _run(capsys, env, "--task", "vqa", "--image", env["image"], "--question", "Is there an effusion?",
                        "--out", str(tmp_path / "q"), "--max-new-tokens", "8", "--greedy")
    assert code == 0, err
    code, _, err = _run(capsys, env, "--task", "text", "--text", "Define atelectasis.", "--out", str(tmp_path / "t"),
                        "--max-new-tokens", "8")
    assert code == 0, err
    assert (tmp_path / "t" / "results.jsonl").read_text().count("\n") == 1


def test_image_responses_always_hold_h_times_w_codes(env):
    from llmcxr_jax.infer import tasks
    g = tasks.Generator.load(env["lm"], env["vqgan"])
    sampling = tasks.default_sampling("image", False, None, g.codes_per_image)
    for seed in range(3):
        images, codes, retries, ok, found, _, _ = g.image(["Mild cardiomegaly.", "No acute process."], sampling,
                                                          seed)
        assert codes.shape == (2, 16) and codes.min() >= 0 and codes.max() < 64
        assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
        assert ok.all() and (retries == 0).all() and (found == 16).all()


def test_sampling_settings_reach_the_sampler(env):
    from llmcxr_jax.infer import tasks
    g = tasks.Generator.load(env["lm"], env["vqgan"])
    s = tasks.default_sampling("report", False, 10, g.codes_per_image, temperature=0.5, top_p=0.8, top_k=7)
    assert (s.temperature, s.top_p, s.top_k, s.greedy) == (0.5, 0.8, 7, False)
    # a near-zero temperature samples the argmax: the greedy report
    greedy = g.report([env["image"]] * 2, tasks.default_sampling("report", True, 10, g.codes_per_image), 0)
    cold = g.report([env["image"]] * 2, tasks.default_sampling("report", False, 10, g.codes_per_image, 1e-4, 1.0), 3)
    hot = [g.report([env["image"]] * 2, tasks.default_sampling("report", False, 10, g.codes_per_image, 5.0, 1.0), s)
           for s in range(3)]
    assert cold == greedy and any(h != greedy for h in hot)


@pytest.mark.parametrize("args, message", [
    (["--task", "report", "--image", "{dir}/missing.jpg"], "missing.jpg"),
    (["--task", "image", "--report", "   "], "report is empty"),
    (["--task", "vqa", "--image", "{image}"], "--question"),
    (["--task", "report", "--image", "{image}", "--ckpt", "{lm0}"], "no image-token rows"),
    (["--task", "report", "--image", "{image}", "--temperature", "0"], "temperature must be > 0"),
    (["--task", "image", "--report", "Effusion.", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--task", "report", "--inputs", "{dir}/no_images"], "has no .jpg/.jpeg/.png image; nothing to generate"),
    (["--task", "image", "--inputs", "{dir}/blank.txt"], "has no non-empty line; nothing to generate"),
    (["--task", "text", "--inputs", "{dir}/absent.txt"], "does not exist; give a list file"),
    (["--task", "text", "--inputs", "{dir}/no_images"], "is a folder; --task text takes a list file"),
    (["--task", "text", "--text", "Hi.", "--out", "{dir}/blank.txt"], "blank.txt: File exists; give a new directory"),
    (["--task", "text", "--text", "Hi.", "--out", "{dir}/blank.txt/o"],
     "o: Not a directory (part of the path is a file)"),
    (["--task", "vqa", "--image", "{image}", "--question", "Q?", "--instruction", "Say it."],
     "--instruction applies to the report and image tasks, not vqa"),
    (["--task", "text", "--text", "Hi.", "--instructions", "{dir}/blank.txt"],
     "--instructions applies to the report and image tasks, not text"),
    (["--task", "report", "--image", "{image}", "--instructions", "{dir}/blank.txt"],
     "blank.txt holds no instructions"),
    (["--task", "report", "--image", "{image}", "--instructions", "{dir}/no_images"],
     "no_images is a folder without report_instructions.txt"),
    (["--task", "image", "--report", "Effusion.", "--instruction", "Draw <image> now."], "contains '<image>'"),
    (["--task", "image", "--report", "Effusion.", "--image-decoding", "retry", "--max-retries", "-1"],
     "max_retries must be >= 0 (0: one try, no retry), got -1"),
    (["--task", "image", "--report", "Effusion.", "--max-retries", "3"],
     "--max-retries applies with --image-decoding retry"),
    (["--task", "report", "--image", "{image}", "--image-decoding", "retry"],
     "--image-decoding applies to --task image, not report"),
])
def test_bad_input_is_one_line(capsys, env, tmp_path, args, message):
    (env["dir"] / "no_images").mkdir(exist_ok=True)
    (env["dir"] / "no_images" / "notes.txt").write_text("not an image")
    (env["dir"] / "blank.txt").write_text("\n  \n")
    args = [a.format(**{k: str(v) for k, v in env.items()}) for a in args]
    code, _, err = _run(capsys, env, "--out", str(tmp_path / "o"), *args)  # an --out in args comes last and wins
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err


def test_codebook_mismatch_is_refused(capsys, env, tmp_path):
    small = VQGANConfig(**{**VQ.to_dict(), "n_embed": 32})
    checkpoint.save_vqgan(str(tmp_path / "vq32"), init_vqgan(small, 0))
    code = cli.main(["generate", "--ckpt", env["lm"], "--vqgan", str(tmp_path / "vq32"), "--task", "text",
                     "--text", "hi", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "32 codes" in err and "64 image rows" in err


REPORT_INSTRUCTIONS = ["Jot down what this film shows.", "Report on the radiograph as a resident would.",
                       "Give the impression for the study attached."]
BLURB = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def _rows(out_dir):
    return [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]


def test_instructions_file_is_drawn_per_input_with_the_seed(capsys, env, tmp_path):
    from llmcxr_jax.data import instructions

    (tmp_path / "report.txt").write_text("\n".join(REPORT_INSTRUCTIONS) + "\n")
    (tmp_path / "inputs.txt").write_text((env["image"] + "\n") * 8)
    base = ["--task", "report", "--inputs", str(tmp_path / "inputs.txt"), "--max-new-tokens", "1", "--greedy"]
    used = {}
    for name, seed in (("a", "3"), ("again", "3"), ("b", "4")):
        code, _, err = _run(capsys, env, *base, "--instructions", str(tmp_path / "report.txt"), "--seed", seed,
                            "--out", str(tmp_path / name))
        assert code == 0, err
        used[name] = [r["instruction"] for r in _rows(tmp_path / name)]
    assert used["a"] == used["again"] and used["a"] != used["b"]  # a function of the seed
    assert set(used["a"]) <= set(REPORT_INSTRUCTIONS) and len(set(used["a"])) > 1  # one drawn per input
    code, _, err = _run(capsys, env, *base, "--instruction", "Read this film aloud.", "--out", str(tmp_path / "one"))
    assert code == 0, err
    assert {r["instruction"] for r in _rows(tmp_path / "one")} == {"Read this film aloud."}
    # report->CXR reads image_instructions.txt from the folder extract-instructions writes
    instructions.write_instructions({"report": ["Unused here."], "image": ["Sketch a chest film for this text."]},
                                    str(tmp_path / "folder"))
    code, _, err = _run(capsys, env, "--task", "image", "--report", "Small left effusion.", "--instructions",
                        str(tmp_path / "folder"), "--out", str(tmp_path / "img"))
    assert code == 0, err
    assert [r["instruction"] for r in _rows(tmp_path / "img")] == ["Sketch a chest film for this text."]
    code, _, err = _run(capsys, env, "--task", "vqa", "--image", env["image"], "--question", "Is it clear?",
                        "--max-new-tokens", "1", "--out", str(tmp_path / "q"))
    assert code == 0, err
    assert _rows(tmp_path / "q")[0]["instruction"] == "Is it clear?"  # vqa's instruction is its question


def test_each_input_gets_its_own_instruction_in_the_prompt(env):
    """The prompt ids of each input are those of REFERENCE.md's generation prompt with its own instruction."""
    from llmcxr_jax.infer import tasks
    g = tasks.Generator.load(env["lm"], env["vqgan"])
    codes = g.encode_images([env["image"]])[0]
    ids = g.report_prompts([env["image"]] * 2, REPORT_INSTRUCTIONS[:2])
    for ins, got in zip(REPORT_INSTRUCTIONS[:2], ids):
        text = f"{BLURB}\n\n### Instruction:\n{ins}\n\nInput:\n<image>\n\n### Response:\n"
        np.testing.assert_array_equal(got, g.encoder.encode(text, codes))
    drawn = g.image_prompts(["Mild edema.", "No effusion."], ["Render the described chest.", "Draw the note."])
    for ins, report, got in zip(["Render the described chest.", "Draw the note."], ["Mild edema.", "No effusion."],
                                drawn):
        text = f"{BLURB}\n\n### Instruction:\n{ins}\n\nInput:\n{report}\n\n### Response:\n"
        np.testing.assert_array_equal(got, g.encoder.encode(text))
    default = g.image_prompts(["Mild edema."])[0]
    text = f"{BLURB}\n\n### Instruction:\n{tasks.DEFAULT_INSTRUCTION['image']}\n\nInput:\nMild edema.\n\n"
    np.testing.assert_array_equal(default, g.encoder.encode(text + "### Response:\n"))
    with pytest.raises(ValueError, match="2 report instructions for 1 inputs; give one per input"):
        g.report_prompts([env["image"]], REPORT_INSTRUCTIONS[:2])


def test_instruction_and_instructions_together_are_refused(capsys, env, tmp_path):
    with pytest.raises(SystemExit) as e:
        _run(capsys, env, "--task", "report", "--image", env["image"], "--instruction", "A.", "--instructions",
             str(tmp_path / "x.txt"), "--out", str(tmp_path / "o"))
    assert e.value.code == 2 and "not allowed with argument --instruction" in capsys.readouterr().err


def _fixed(capsys, env, *args):
    code = cli.main(["generate", "--ckpt", env["fixed"], "--vqgan", env["vqgan"], *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_retry_decoding_records_retries_per_input(capsys, env, tmp_path):
    """--image-decoding retry on an LM whose responses hold Binomial(60, 4/15) image ids: each row of
    results.jsonl carries its retries, the same the library reports for that seed, and a PNG."""
    from llmcxr_jax.infer import tasks

    reports = ["Small left effusion.", "No acute process.", "Mild cardiomegaly.", "Right basal opacity."]
    (tmp_path / "reports.txt").write_text("\n".join(reports) + "\n")
    code, _, err = _fixed(capsys, env, "--task", "image", "--inputs", str(tmp_path / "reports.txt"), "--image-decoding",
                          "retry", "--max-retries", "80", "--top-p", "1", "--seed", "3", "--out", str(tmp_path / "o"))
    assert code == 0, err
    rows = _rows(tmp_path / "o")
    assert [r["image_decoding"] for r in rows] == ["retry"] * 4 and not any("error" in r for r in rows)
    assert all((tmp_path / "o" / f"image_{i:04d}.png").is_file() and r["output"].endswith(f"image_{i:04d}.png")
               for i, r in enumerate(rows))
    g = tasks.Generator.load(env["fixed"], env["vqgan"])
    sampling = tasks.default_sampling("image", False, None, 16, top_p=1.0, image_decoding="retry")
    drawn = g.image(reports, sampling, 3, None, "retry", 80)
    assert [r["retries"] for r in rows] == drawn.retries.tolist() and sum(drawn.retries) > 0
    code, _, err = _fixed(capsys, env, "--task", "image", "--report", reports[0], "--out", str(tmp_path / "c"))
    assert code == 0, err
    assert _rows(tmp_path / "c")[0]["retries"] == 0 and _rows(tmp_path / "c")[0]["image_decoding"] == "constrained"


def test_retry_cap_is_a_clear_failure(capsys, env, tmp_path):
    """16 new tokens almost never hold 16 image ids here: after 1 + 2 tries each input is marked failed
    in results.jsonl (no PNG) and the command ends on one line with exit status 2."""
    code, out, err = _fixed(capsys, env, "--task", "image", "--report", "Effusion.", "--image-decoding", "retry",
                            "--max-retries", "2", "--max-new-tokens", "16", "--top-p", "1", "--out", str(tmp_path))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("llmcxr generate: error: 1 of 1 reports got no image, e.g. no response held exactly "
                               "16 image tokens in 3 tries (the last held ")
    assert "results.jsonl marks them; raise --max-retries or use --image-decoding constrained" in lines[0]
    row = _rows(tmp_path)[0]
    assert row["output"] is None and row["retries"] == 2 and row["error"].startswith("no response held exactly 16")
    assert json.loads(out.splitlines()[-1])["results"] == [row] and not list(tmp_path.glob("*.png"))


def test_bfloat16_and_clean_up_reach_generate(capsys, env, tmp_path):
    """--dtype bfloat16 generates; the report's spaces before full stops go unless
    --keep-tokenization-spaces keeps them (the fixed LM writes only spaces and full stops)."""
    base = ["--task", "report", "--image", env["image"], "--max-new-tokens", "30", "--seed", "1"]
    texts = {}
    for name, extra in (("clean", []), ("kept", ["--keep-tokenization-spaces"]), ("bf16", ["--dtype", "bfloat16"])):
        code, _, err = _fixed(capsys, env, *base, *extra, "--out", str(tmp_path / name))
        assert code == 0, err
        texts[name] = _rows(tmp_path / name)[0]["output"]
    from llmcxr_jax.infer.detokenize import clean_up_tokenization
    assert " ." in texts["kept"] and texts["clean"] == clean_up_tokenization(" " + texts["kept"]).strip()
    assert texts["bf16"] == texts["clean"]  # one fixed distribution: rounding cannot move it


@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_max_retries_help_states_the_library_default(capsys, command):
    """The help text (written without importing JAX) names the default the library applies."""
    from llmcxr_jax.infer import tasks

    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    assert f"retries before an input fails (default: {tasks.MAX_RETRIES})" in " ".join(capsys.readouterr().out.split())
