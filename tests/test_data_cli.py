"""The data commands end to end: synth -> encode-images -> export-codes -> import-codes, and
their one-line errors."""
import json
import pickle

import numpy as np
import pytest

from llmcxr_jax import checkpoint, cli
from llmcxr_jax.data import codes as code_files
from llmcxr_jax.data import mimic_cxr
from llmcxr_jax.models.vqgan import VQGANConfig, init_vqgan

# 32 px, one downsampling: 16 x 16 = 256 codes per image, as LLM-CXR.
CFG = VQGANConfig(resolution=32, in_channels=3, out_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                  attn_resolutions=(), z_channels=32, embed_dim=32, n_embed=64, beta=0.25, dropout=0.0,
                  legacy_loss=True, dtype="float32", param_dtype="float32")


def _last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_synth_encode_export_import(tmp_path, capsys):
    root, vq, out = tmp_path / "corpus", tmp_path / "vqgan", tmp_path / "codes"
    assert cli.main(["synth", "--out", str(root), "--num-images", "24", "--image-size", "48", "--seed", "1"]) == 0
    made = _last_json(capsys)
    assert made["images"] == 24
    corpus = mimic_cxr.load_corpus(root, progress=False)
    checkpoint.save_vqgan(str(vq), init_vqgan(CFG, 0))
    args = ["encode-images", "--vqgan", str(vq), "--data", str(root), "--out", str(out), "--batch-size", "8",
            "--mesh", "8,1,1", "--shard-size", "10"]
    assert cli.main(args) == 0
    first = _last_json(capsys)
    assert first["images_encoded"] == len(corpus.records) and first["index_written"]
    assert first["codes_per_image"] == 256 and first["codebook_size"] == 64
    assert cli.main(args) == 0  # a rerun reuses every shard
    again = _last_json(capsys)
    assert again["images_encoded"] == 0 and again["shards_reused"] == first["shards_encoded"]

    table = code_files.read_codes(str(out))
    assert set(table) == {r.dicom_id for r in corpus.records}
    pkl = tmp_path / "codes.pickle"
    assert cli.main(["export-codes", "--codes", str(out), "--pickle", str(pkl)]) == 0
    with open(pkl, "rb") as f:
        plain = pickle.load(f)
    assert all(isinstance(v, list) and len(v) == 256 for v in plain.values())
    back = tmp_path / "back"
    assert cli.main(["import-codes", "--pickle", str(pkl), "--out", str(back), "--codebook-size", "64"]) == 0
    assert _last_json(capsys)["images"] == len(table)
    again = code_files.read_codes(str(back))
    for k in table:
        np.testing.assert_array_equal(again[k], table[k])


@pytest.mark.parametrize("argv, message", [
    (["encode-images", "--vqgan", "{tmp}/none", "--data", "{tmp}/nowhere", "--out", "{tmp}/o"], "not a directory"),
    (["import-codes", "--pickle", "{tmp}/missing.pickle", "--out", "{tmp}/o"], "missing.pickle"),
    (["synth", "--out", "{tmp}/busy", "--num-images", "4", "--image-size", "32"], "busy"),
])
def test_data_commands_fail_in_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "unrelated.txt").write_text("keep me")
    code = cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert (tmp_path / "busy" / "unrelated.txt").read_text() == "keep me"
