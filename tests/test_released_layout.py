"""examples/released_checkpoints.sh on a tiny stand-in laid out as LLM-CXR's two archives: every command a holder
of the release runs exits 0; import-hf keeps the trained image rows at T..T+K-1 (T = len(tokenizer), counting
dolly's "### Response:" beside LLM-CXR's "### Response:\\n"), from one .bin or 4.28's two shards alike;
import-vqgan takes the Lightning .ckpt's generator tensors exactly; generated images have the VQ-GAN's size;
and generate prompts with the instructions extracted from the code clone."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = pytest.mark.torch

ROOT = os.path.join(os.path.dirname(__file__), "..")
spec = importlib.util.spec_from_file_location("released_layout", os.path.join(ROOT, "examples", "released_layout.py"))
layout = importlib.util.module_from_spec(spec)
spec.loader.exec_module(layout)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The script's work folder and its JSON lines, in order ({} for a line that is not JSON)."""
    work = str(tmp_path_factory.mktemp("released") / "work")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    done = subprocess.run(["bash", os.path.join("examples", "released_checkpoints.sh"), work], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [json.loads(line) if line.startswith("{") else {} for line in done.stdout.splitlines()]
    return work, [line for line in lines if line], done.stdout


def paths(work: str) -> dict[str, str]:
    ckpts = os.path.join(work, "llm-cxr", "ckpts")
    return {"hf": os.path.join(ckpts, layout.LLM_DIR), "vq": os.path.join(ckpts, layout.VQGAN_DIR),
            "lm": os.path.join(work, "lm"), "vqgan": os.path.join(work, "vqgan")}


def test_every_command_ran_and_reported(run):
    work, emitted, stdout = run
    outs = [os.path.relpath(e["out"], work) for e in emitted]
    assert outs == ["lm", "vqgan", "instructions", "reports", "images_drawn", "export"]
    assert emitted[0]["text_size"] + emitted[0]["image_codes"] == emitted[0]["vocab_rows"]
    assert emitted[1]["codes_per_image"] == 64 and emitted[1]["ignored_loss_tensors"] > 0
    assert all("error" not in row for e in emitted[3:5] for row in e["results"])
    assert "max |logits(JAX) - logits(transformers)|" in stdout  # the export reloads in transformers


def test_import_keeps_the_trained_image_rows(run):
    from llmcxr_jax import checkpoint, sharding

    work, emitted, _ = run
    p = paths(work)
    with open(os.path.join(p["hf"], "config.json")) as f:
        rows = json.load(f)["vocab_size"]
    state = torch.load(os.path.join(p["hf"], "pytorch_model.bin"), weights_only=True)
    lm = checkpoint.load_lm(p["lm"], sharding.make_mesh("1,-1,1"), dtype="float32")
    k = layout.N_EMBED
    assert lm.layout.text_size == rows - k and lm.layout.image_codes == k  # T counts all four added tokens
    image_ids = lm.layout.image_token(np.arange(k))
    embed_in = np.asarray(lm.model.embed_in["embedding"].get_value())  # [padded rows, hidden]
    embed_out = np.asarray(lm.model.embed_out["kernel"].get_value()).T  # [padded rows, hidden]
    np.testing.assert_array_equal(embed_in[image_ids], state["gpt_neox.embed_in.weight"].numpy()[rows - k:])
    np.testing.assert_array_equal(embed_out[image_ids], state["embed_out.weight"].numpy()[rows - k:])
    np.testing.assert_array_equal(embed_in[:rows], state["gpt_neox.embed_in.weight"].numpy())
    assert not embed_in[rows:].any()  # padding only after T + K


def test_sharded_weights_import_the_same_model(run, tmp_path, capsys):
    """The other way a 2.8B float32 model leaves transformers 4.28 (save_pretrained at 10GB shards)."""
    import jax
    from flax import nnx

    from llmcxr_jax import checkpoint, cli, sharding

    work, _, _ = run
    with open(os.path.join(work, "reports.txt")) as f:
        reports = f.read().splitlines()
    hf = str(tmp_path / layout.LLM_DIR)
    made = layout.write_lm(hf, layout.tokenizer_texts(reports), seed=0, sharded=True)
    assert made["weights"] == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    assert cli.main(["import-hf", "--hf", hf, "--out", str(tmp_path / "lm"), "--image-codes", str(layout.N_EMBED)]) \
        == 0, capsys.readouterr()
    mesh = sharding.make_mesh("1,-1,1")
    one = checkpoint.load_lm(paths(work)["lm"], mesh, dtype="float32").model
    two = checkpoint.load_lm(str(tmp_path / "lm"), mesh, dtype="float32").model
    jax.tree.map(np.testing.assert_array_equal, nnx.state(one, nnx.Param).to_pure_dict(),
                 nnx.state(two, nnx.Param).to_pure_dict())


def test_vqgan_import_takes_the_checkpoints_generator_exactly(run):
    from llmcxr_jax import checkpoint, sharding
    from llmcxr_jax.convert import taming_vqgan

    work, emitted, _ = run
    p = paths(work)
    assert "pytorch_lightning" not in sys.modules
    with layout.lightning_stand_ins():  # torch's own unpickler needs the classes the file names
        ck = torch.load(os.path.join(p["vq"], layout.VQGAN_CKPT), weights_only=False)
    assert "pytorch_lightning" not in sys.modules  # the stand-ins were taken out again
    (callback,) = ck["callbacks"]
    assert f"{callback.__module__}.{callback.__qualname__}" == "pytorch_lightning.callbacks.model_checkpoint." \
        "ModelCheckpoint" and len(ck["optimizer_states"]) == 2 and ck["hyper_parameters"]["n_embed"] == 64
    generator = {k: v.numpy() for k, v in ck["state_dict"].items() if not k.startswith("loss.")}
    assert emitted[1]["ignored_loss_tensors"] == len(ck["state_dict"]) - len(generator)
    model, _ = checkpoint.load_vqgan(p["vqgan"], sharding.make_mesh("-1,1,1"))
    ours = taming_vqgan.to_taming_state_dict(model)
    assert sorted(ours) == sorted(generator)
    for key, value in generator.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)


def test_generated_images_have_the_vqgan_size(run):
    from PIL import Image

    work, emitted, _ = run
    cfg = layout.vqgan_config()
    assert cfg.latent_size ** 2 == emitted[1]["codes_per_image"] == layout.N_EMBED
    rows = [json.loads(line) for line in open(os.path.join(work, "images_drawn", "results.jsonl"))]
    assert len(rows) == 2
    for row in rows:
        with Image.open(row["output"]) as im:
            assert im.size == (cfg.resolution, cfg.resolution)


def test_generate_prompts_with_the_extracted_instructions(run):
    from llmcxr_jax.data import prompts

    work, _, _ = run
    extracted = {}
    for task, made_up in (("report", layout.REPORT_INSTRUCTIONS), ("image", layout.IMAGE_INSTRUCTIONS)):
        with open(os.path.join(work, "instructions", f"{task}_instructions.txt")) as f:
            extracted[task] = f.read().splitlines()
        assert extracted[task] == list(made_up)
    for task, folder in (("report", "reports"), ("image", "images_drawn")):
        rows = [json.loads(line) for line in open(os.path.join(work, folder, "results.jsonl"))]
        for row in rows:
            assert row["task"] == task and row["instruction"] in extracted[task]
            assert row["instruction"] not in prompts.REPORT_INSTRUCTIONS + prompts.IMAGE_INSTRUCTIONS
