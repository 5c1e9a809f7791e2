"""encode-images: codes equal a direct VQModel.encode, resume skips committed shards, two
processes split the shards, bad images and bad entries are skipped and listed, and LLM-CXR
pickles round-trip while a malicious one is refused without running."""
import collections
import os
import pickle

import jax
import numpy as np
import pytest
from PIL import Image

from llmcxr_jax import checkpoint
from llmcxr_jax.data import codes as code_files
from llmcxr_jax.data import encode
from llmcxr_jax.data.images import load_image
from llmcxr_jax.models.vqgan import VQGANConfig, init_vqgan
from llmcxr_jax.sharding import make_mesh

# 32 px, one downsampling: a 16 x 16 latent = 256 codes per image like LLM-CXR, compiled in seconds.
CFG = VQGANConfig(resolution=32, in_channels=3, out_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                  attn_resolutions=(), z_channels=32, embed_dim=32, n_embed=64, beta=0.25, dropout=0.0,
                  legacy_loss=True, dtype="float32", param_dtype="float32")
N_IMAGES = 21


@pytest.fixture(scope="module")
def vqgan_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("vqgan"))
    checkpoint.save_vqgan(d, init_vqgan(CFG, 0))
    return d


@pytest.fixture(scope="module")
def image_list(tmp_path_factory):
    """Non-square JPEGs larger than the model input, so the resize and crop run."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    out = []
    for n in range(N_IMAGES):
        arr = rng.integers(0, 256, (40 + n % 3, 36), dtype=np.uint8)
        path = str(d / f"img{n:03d}.jpg")
        Image.fromarray(arr).convert("RGB" if n % 2 else "L").save(path, quality=90)
        out.append((f"dicom{n:03d}", path))
    return out


@pytest.fixture(scope="module")
def mesh():
    return make_mesh("4,2,1")


def _run(vqgan, items, out, mesh, **kw):
    kw.setdefault("batch_size", 8)
    kw.setdefault("shard_size", 8)
    return encode.encode_images(vqgan, items, str(out), mesh=mesh, progress=False, **kw)


def _shard_bytes(out):
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out)) if n.endswith(".array_record")}


@pytest.fixture(scope="module")
def full_run(vqgan_dir, image_list, mesh, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    summary = _run(vqgan_dir, image_list, out, mesh)
    return out, summary


def test_codes_equal_direct_encode(vqgan_dir, image_list, full_run, mesh):
    out, summary = full_run
    assert summary["images_encoded"] == N_IMAGES and summary["index_written"] and summary["num_shards"] == 3
    model, _ = checkpoint.load_vqgan(vqgan_dir, mesh)
    x = np.stack([load_image(p, CFG.resolution, CFG.in_channels) for _, p in image_list])
    want = np.asarray(jax.jit(lambda m, x: m.encode(x)[0])(model, x))  # unsharded, one batch of 21
    table = encode.read_codes(str(out))
    assert list(table) == [i for i, _ in image_list]
    assert table.codes_per_image == 256 and table.codebook_size == 64 and not table.skipped
    np.testing.assert_array_equal(table.codes, want.astype(np.uint16))
    assert len(np.unique(want)) > 4  # the codes are not trivially constant
    index = table.metadata
    assert index["format"] == "llmcxr-codes-v1" and index["vqgan"]["n_embed"] == 64
    assert [s["count"] for s in index["shards"]] == [8, 8, 5]
    assert index["shards"][0]["file"] == "codes-00000-of-00003.array_record"


def test_resume_skips_committed_shards(vqgan_dir, image_list, full_run, mesh, tmp_path):
    out = tmp_path / "codes"

    def crash_after_two(shard):
        if shard == 1:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        _run(vqgan_dir, image_list, out, mesh, on_shard_done=crash_after_two)
    assert sorted(os.listdir(out)) == ["codes-00000-of-00003.array_record", "codes-00000-of-00003.json",
                                       "codes-00001-of-00003.array_record", "codes-00001-of-00003.json"]
    assert encode.read_codes(str(out)).missing_shards == [2]
    # a writer killed mid-shard leaves only a dot-named temp file, which resume removes
    stale = out / ".codes-00002-of-00003.array_record.tmp-99999"
    stale.write_bytes(b"half")
    mtimes = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out) if n.startswith("codes-")}
    summary = _run(vqgan_dir, image_list, out, mesh)
    assert summary["shards_reused"] == [0, 1] and summary["shards_encoded"] == [2]
    assert summary["images_encoded"] == 5 and not stale.exists()
    assert all(os.stat(out / n).st_mtime_ns == t for n, t in mtimes.items())
    assert _shard_bytes(out) == _shard_bytes(full_run[0])
    # a corrupted committed shard is redone, and only that one
    path = out / "codes-00001-of-00003.array_record"
    path.write_bytes(path.read_bytes()[:-7])
    summary = _run(vqgan_dir, image_list, out, mesh)
    assert summary["shards_encoded"] == [1] and summary["images_encoded"] == 8
    assert _shard_bytes(out) == _shard_bytes(full_run[0])


def test_resume_refuses_another_list(vqgan_dir, image_list, full_run, mesh):
    changed = [(i + "x", p) if n == 0 else (i, p) for n, (i, p) in enumerate(image_list)]
    with pytest.raises(ValueError, match="another image list"):
        _run(vqgan_dir, changed, full_run[0], mesh)
    with pytest.raises(ValueError, match="another run"):
        _run(vqgan_dir, image_list, full_run[0], mesh, shard_size=4)
    with pytest.raises(ValueError, match="twice"):
        _run(vqgan_dir, image_list + image_list[:1], full_run[0], mesh)


def test_a_directory_of_other_files_is_not_mixed_into(vqgan_dir, image_list, mesh, tmp_path):
    """--out pointing at, say, a tokenizer directory is refused before anything is written there."""
    other = tmp_path / "tokenizer"
    other.mkdir()
    (other / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="holds files that are not codes \\(e.g. tokenizer.json\\)"):
        _run(vqgan_dir, image_list, other, mesh)
    with pytest.raises(ValueError, match="holds files that are not codes"):
        encode.import_pickle(_llmcxr_pickle(tmp_path / "in.pkl", {"a": [0] * 256}), str(other))
    assert os.listdir(other) == ["tokenizer.json"]


def test_two_processes_split_shards(vqgan_dir, image_list, full_run, mesh, tmp_path):
    out = tmp_path / "codes"
    first = _run(vqgan_dir, image_list, out, mesh, process_index=0, process_count=2)
    assert first["shards_owned"] == [0, 2] and not first["index_written"]
    partial = encode.read_codes(str(out))
    assert partial.missing_shards == [1] and len(partial) == 13
    second = _run(vqgan_dir, image_list, out, mesh, process_index=1, process_count=2)
    assert second["shards_owned"] == [1] and second["index_written"]
    assert first["images_encoded"] + second["images_encoded"] == N_IMAGES
    whole, ref = encode.read_codes(str(out)), encode.read_codes(str(full_run[0]))
    assert list(whole) == list(ref) and not whole.missing_shards
    np.testing.assert_array_equal(whole.codes, ref.codes)


def test_bad_images_skipped_and_listed(vqgan_dir, image_list, full_run, mesh, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    items = image_list[:5] + [("corrupt", str(bad)), ("missing", str(tmp_path / "nope.jpg"))]
    out = tmp_path / "codes"
    summary = _run(vqgan_dir, items, out, mesh, num_workers=1)  # through a grain worker process
    assert summary["images_encoded"] == 5 and summary["images_skipped"] == 2
    assert summary["skipped"] == {"unreadable_image": 1, "missing_file": 1}
    table = encode.read_codes(str(out))
    assert len(table) == 5 and "corrupt" not in table
    assert {i["dicom_id"]: i["reason"] for i in table.metadata["skipped_items"]} == {
        "corrupt": "unreadable_image", "missing": "missing_file"}
    ref = encode.read_codes(str(full_run[0]))
    for i, _ in image_list[:5]:
        np.testing.assert_array_equal(table[i], ref[i])


def test_batch_must_fit_mesh(vqgan_dir, image_list, mesh, tmp_path):
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        _run(vqgan_dir, image_list, tmp_path, mesh, batch_size=12)


def test_read_codes_skips_bad_entries(tmp_path):
    good = np.arange(16, dtype=np.int64) % 8
    entries = [("a", good), ("b", good[:15]), ("c", np.where(good == 0, 8, good)), ("d", good)]
    code_files.write_shard(str(tmp_path), 0, 1, entries, {
        "codes_per_image": 16, "codebook_size": 8, "vqgan": None, "ids_sha256": "", "skipped": []})
    table = encode.read_codes(str(tmp_path))
    assert list(table) == ["a", "d"] and table["a"].dtype == np.uint16
    assert table.skipped == collections.Counter(wrong_length=1, code_out_of_range=1)
    assert sorted(table.skipped_items) == [("b", "wrong_length"), ("c", "code_out_of_range")]
    # a larger codebook given by the caller admits "c"
    assert list(encode.read_codes(str(tmp_path), codebook_size=9)) == ["a", "c", "d"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no committed code shards"):
        encode.read_codes(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no codes at"):
        encode.read_codes(str(tmp_path / "absent.pkl"))


def test_record_round_trip_and_errors():
    rec = encode.encode_code_record("p10/ü", np.array([0, 1023, 65535]))
    ident, codes = encode.decode_code_record(rec)
    assert ident == "p10/ü" and codes.tolist() == [0, 1023, 65535] and codes.dtype == np.uint16
    with pytest.raises(ValueError, match="bad magic"):
        encode.decode_code_record(b"XXXX" + rec[4:])
    with pytest.raises(ValueError, match="uint16"):
        encode.encode_code_record("a", np.array([65536]))


def _llmcxr_pickle(path, data, protocol=4):
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    return str(path)


def test_pickle_import_export_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    data = {f"id{n}": rng.integers(0, 1024, 256).tolist() for n in range(7)}
    bad = {"short": [1, 2, 3], "big": [1024] * 256, "negative": [-1] * 256, "floats": [0.5] * 256,
           "text": "abc", "nested": [[1] * 256]}
    index = encode.import_pickle(_llmcxr_pickle(tmp_path / "in.pkl", {**data, **bad}), str(tmp_path / "codes"),
                                 shard_size=3)
    assert index["num_codes"] == 7 and len(index["shards"]) == 3
    assert index["skipped"] == {"code_out_of_range": 2, "wrong_length": 2, "not_integer_codes": 2}
    assert encode.export_pickle(str(tmp_path / "codes"), str(tmp_path / "out.pkl")) == 7
    with open(tmp_path / "out.pkl", "rb") as f:
        back = pickle.load(f)  # what LLM-CXR's training code does
    assert back == data and type(back) is dict
    assert all(type(c) is int for v in back.values() for c in v)
    # into a folder that does not exist yet; and a pickle with no entry of the expected length is an
    # error that names the flags, with nothing written (it used to import 0 images and succeed)
    assert encode.export_pickle(str(tmp_path / "codes"), str(tmp_path / "new" / "dir" / "out.pkl")) == 7
    short = _llmcxr_pickle(tmp_path / "short.pkl", {f"id{n}": [1] * 64 for n in range(3)})
    with pytest.raises(ValueError, match=r"no entry of 256 codes in \[0, 1024\) \(skipped: \{'wrong_length': 3\}\); "
                                         r"give .* \(--codes-per-image, --codebook-size\)"):
        encode.import_pickle(short, str(tmp_path / "c64"))
    assert not (tmp_path / "c64").exists()
    assert encode.import_pickle(short, str(tmp_path / "c64"), codes_per_image=64)["num_codes"] == 3


def test_pickle_with_numpy_values(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {f"a{n}": rng.integers(0, 1024, 256) for n in range(3)}
    for protocol in (2, 3, 4, 5):
        data = {"arr": arrays["a0"], "u16": arrays["a1"].astype(np.uint16),
                "scalars": [np.int64(v) for v in arrays["a2"]]}
        table = encode.read_codes(_llmcxr_pickle(tmp_path / f"np{protocol}.pkl", data, protocol))
        assert not table.skipped, protocol
        for key, ref in zip(("arr", "u16", "scalars"), arrays.values()):
            np.testing.assert_array_equal(table[key], ref)
    floats = _llmcxr_pickle(tmp_path / "f.pkl", {"x": np.zeros(256, np.float32)})
    with pytest.raises(ValueError, match="float32"):
        encode.read_codes(floats)


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_malicious_pickle_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    for n, payload in enumerate([_Evil(marker), {"id": [1] * 256, "evil": _Evil(marker)}]):
        for protocol in (0, 4):
            path = _llmcxr_pickle(tmp_path / f"evil{n}{protocol}.pkl", payload, protocol)
            with pytest.raises(ValueError, match="not a safe LLM-CXR codes pickle") as err:
                encode.read_codes(path)
            assert "\n" not in str(err.value) and "system" in str(err.value)
            with pytest.raises(ValueError):
                encode.import_pickle(path, str(tmp_path / f"codes{n}{protocol}"))
    assert not marker.exists()
    with pytest.raises(ValueError, match="not LLM-CXR's dict"):
        encode.read_codes(_llmcxr_pickle(tmp_path / "list.pkl", [[1] * 256]))
