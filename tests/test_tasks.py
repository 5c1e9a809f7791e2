"""`llmcxr generate` on a tiny random LM and VQ-GAN: every task runs end to end, image responses
always carry exactly h*w codes, and bad input fails in one line."""
import json

import numpy as np
import pytest
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
            "vqgan": str(d / "vqgan"), "image": image, "dir": d}


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
        images, codes = g.image(["Mild cardiomegaly.", "No acute process."], sampling, seed)
        assert codes.shape == (2, 16) and codes.min() >= 0 and codes.max() < 64
        assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()


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
