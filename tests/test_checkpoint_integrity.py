"""Checksums on every checkpoint (issue 25): a newest step with a cut or a silently flipped array file is refused
by `generate` in one line naming the step, the array and the newest intact step; a checkpoint written before
checksums still loads, with one notice; `llmcxr verify` and its exit codes on orbax checkpoints, an HF export
with a cut safetensors and a cut taming .ckpt. Resume past a damaged step: tests/test_lm_signals.py."""
import os
import re
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from generator_helpers import VQ, tiny_lm
from integrity_helpers import cut, flip_silently
from lm_helpers import make_tokenizer

from llmcxr_jax import checkpoint, checkpoint_checksums, sharding
from llmcxr_jax.cli.main import main
from llmcxr_jax.models.vqgan import init_vqgan

CHECKSUM = r"params\.[\w.]+ fails its checksum"
CUT = r"params\.[\w.]+ cannot be read \(file cut short\?\)"


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A tiny LM checkpoint with steps 2 and 4 (import-hf's params-only layout), and its tokenizer."""
    base = tmp_path_factory.mktemp("integrity")
    make_tokenizer(str(base / "tok"))
    for step in (2, 4):
        tiny_lm(str(base / "ck"), str(base / "tok"), 64, step=step)
    return str(base / "ck")


def _copy(lm_dir, tmp_path) -> str:
    return shutil.copytree(lm_dir, str(tmp_path / "ck"))


def _run(capsys, *argv) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err.strip().splitlines()


@pytest.mark.parametrize("damage,why", [(cut, CUT), (flip_silently, CHECKSUM)], ids=["cut", "flipped"])
def test_generate_refuses_a_damaged_newest_step_in_one_line(lm_dir, tmp_path, capsys, damage, why):
    ck = _copy(lm_dir, tmp_path)
    damage(os.path.join(ck, "4"))
    code, err = _run(capsys, "generate", "--ckpt", ck, "--vqgan", str(tmp_path / "never-read"), "--task", "text",
                     "--text", "hello", "--out", str(tmp_path / "out"))
    assert code == 2
    assert re.fullmatch(rf"llmcxr generate: error: checkpoint step 4 in {re.escape(ck)} is damaged: {why}; "
                        r"step 2 is intact", err[-1]), err
    code, err = _run(capsys, "verify", ck, "--all")  # the same array, found without a device or a mesh
    assert code == 1 and re.fullmatch(rf"step 4: damaged: {why}", err[0]) and err[1] == "step 2: intact", err


def test_verify_exit_codes_and_which_steps_it_reads(lm_dir, tmp_path, capsys):
    assert _run(capsys, "verify", lm_dir) == (0, ["step 4: intact"])
    assert _run(capsys, "verify", lm_dir, "--all") == (0, ["step 4: intact", "step 2: intact"])
    ck = _copy(lm_dir, tmp_path)
    flip_silently(os.path.join(ck, "4"))
    code, err = _run(capsys, "verify", ck)
    assert code == 1 and len(err) == 1 and re.fullmatch(rf"step 4: damaged: {CHECKSUM}", err[0]), err
    assert _run(capsys, "verify", ck, "--step", "2") == (0, ["step 2: intact"])
    code, err = _run(capsys, "verify", ck, "--step", "3")
    assert code == 2 and err == [f"llmcxr verify: error: {ck} has no step 3; it holds steps 2, 4"]
    shutil.rmtree(os.path.join(ck, "2", "checksums"))  # its step metadata says checksums were written
    code, err = _run(capsys, "verify", ck, "--step", "2")
    assert code == 1 and err == ["step 2: damaged: its checksum file checksums/process_0.json is missing"]


def test_a_checkpoint_written_before_checksums_loads_with_one_notice(lm_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint_checksums, "_WRITE", False)  # as the code before checksums wrote it
    ck = tiny_lm(str(tmp_path / "old"), os.path.join(os.path.dirname(lm_dir), "tok"), 64, step=3)
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(ck, "3", "checksums"))
    capsys.readouterr()
    mesh = sharding.make_mesh("1,-1,1")
    loaded = checkpoint.load_lm(ck, mesh)
    checkpoint.load_lm(ck, mesh)
    err = capsys.readouterr().err
    assert err.count("carries no checksums") == 1, err
    assert f"checkpoint step 3 in {ck} carries no checksums (written before checksums); it is loaded unchecked" in err
    ours = checkpoint.load_lm(lm_dir, mesh, step=2)  # the same seeded weights, saved with checksums
    old_params, new_params = (jax.tree.leaves(nnx.state(m.model, nnx.Param)) for m in (loaded, ours))
    assert len(old_params) == len(new_params) > 0
    for a, b in zip(old_params, new_params):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    code, err = _run(capsys, "verify", ck)
    assert code == 3 and err == ["step 3: no checksums (written before checksums); every array reads in full"]


def test_verify_an_hf_export_and_its_cut_safetensors(lm_dir, tmp_path, capsys):
    out = str(tmp_path / "hf")
    assert _run(capsys, "export-hf", "--ckpt", lm_dir, "--out", out)[0] == 0
    code, err = _run(capsys, "verify", out)
    assert code == 0 and "model.safetensors: reads in full" in err, err
    path = os.path.join(out, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size * 2 // 3)
    code, err = _run(capsys, "verify", out)
    assert code == 1
    with open(path, "rb") as f:
        data_start = 8 + int.from_bytes(f.read(8), "little")
    assert re.fullmatch(rf"model\.safetensors: damaged: is cut short: its tensors need {size - data_start} bytes of "
                        rf"data but it holds {size * 2 // 3 - data_start}; .*", err[-1]), err


def test_verify_a_taming_ckpt_and_a_cut_one(tmp_path, capsys):
    vq = str(tmp_path / "vq")
    checkpoint.save_vqgan(vq, init_vqgan(VQ, 0))
    ckpt = str(tmp_path / "vq.ckpt")
    assert _run(capsys, "export-vqgan", "--ckpt", vq, "--format", "taming", "--out", ckpt)[0] == 0
    assert _run(capsys, "verify", ckpt) == (0, ["vq.ckpt: reads in full"])
    with open(ckpt, "r+b") as f:
        f.truncate(os.path.getsize(ckpt) // 2)
    code, err = _run(capsys, "verify", ckpt)
    assert code == 1 and len(err) == 1 and err[0].startswith("vq.ckpt: damaged: ") and "cut short" in err[0], err
