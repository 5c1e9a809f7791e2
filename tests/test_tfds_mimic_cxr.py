"""The tfds builder (no TensorFlow): built from the hand-made corpus into a tmp data_dir, read
back with tfds.data_source and grain, counts and fields as data/mimic_cxr.py selects them."""
import io

import grain
import mimic_fixture as fx
import numpy as np
import pytest
from PIL import Image

# tensorflow-datasets is an optional dependency (only this builder uses it).
tfds = pytest.importorskip("tensorflow_datasets")
from llmcxr_jax.data import tfds_mimic_cxr as tm  # noqa: E402

NAME = "mimic_cxr_jpg"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = fx.write_corpus(tmp_path_factory.mktemp("mimic"))
    data_dir = tmp_path_factory.mktemp("tfds")
    for config in ("stage1", "stage2", "eval", "stage2_jpeg"):
        tm.build(root, data_dir, config)
    return root, str(data_dir)


def _source(built, config, split, **kwargs):
    return tfds.data_source(f"{NAME}/{config}", data_dir=built[1], split=split, **kwargs)


def _ids(source):
    return sorted(ex["dicom_id"].decode() for ex in source)


def test_counts_per_config_and_split(built):
    assert _ids(_source(built, "stage1", "train")) == ["d11a", "d11b", "d12a", "d12b", "d12c", "d13a",
                                                       "d21a", "d21b", "d31a", "d61b", "d71a"]
    assert _ids(_source(built, "stage2", "train")) == ["d12a", "d12b", "d21a", "d71a"]
    assert _ids(_source(built, "eval", "validate")) == ["d101a"]
    assert _ids(_source(built, "eval", "test")) == ["d121a", "d121b", "d91a"]
    assert len(_source(built, "eval", "validate+test")) == 4
    # *_jpeg configs decode every image first: the truncated d71a is left out
    assert _ids(_source(built, "stage2_jpeg", "train")) == ["d12a", "d12b", "d21a"]


def test_record_fields(built):
    root = built[0]
    stage2 = {ex["dicom_id"]: ex for ex in _source(built, "stage2", "train")}
    ex = {k: v.decode() for k, v in stage2[b"d12a"].items()}
    assert ex == {"dicom_id": "d12a", "subject_id": "10000001", "study_id": "50000012", "split": "train",
                  "view": "PA", "study_date": "21800506", "study_time": "90512.0",
                  "image_path": "files/p10/p10000001/s50000012/d12a.jpg", "report": fx.GOLDEN_IMPRESSION,
                  "findings": fx.GOLDEN_FINDINGS, "impression": fx.GOLDEN_IMPRESSION}
    stage1 = {ex["dicom_id"]: ex for ex in _source(built, "stage1", "train")}
    assert stage1[b"d12a"]["report"].decode() == fx.GOLDEN_FINDINGS + " " + fx.GOLDEN_IMPRESSION
    assert stage1[b"d31a"]["impression"] == b""   # no IMPRESSION: stage 1 uses the findings alone
    assert stage1[b"d31a"]["report"] == b"Right lower lobe opacity."
    # embedded JPEG: decoded to uint8 [H, W, 1] by default, the file's own bytes with SkipDecoding
    jpeg = {ex["dicom_id"]: ex for ex in _source(built, "stage2_jpeg", "train")}[b"d12a"]
    data = (root / "files/p10/p10000001/s50000012/d12a.jpg").read_bytes()
    np.testing.assert_array_equal(jpeg["image"], np.asarray(Image.open(io.BytesIO(data)))[..., None])
    raw = _source(built, "stage2_jpeg", "train", decoders={"image": tfds.decode.SkipDecoding()})
    assert {ex["dicom_id"]: ex["image"] for ex in raw}[b"d12a"] == data


def test_grain_and_read_only_access(built):
    source = _source(built, "eval", "validate+test")
    ids = grain.MapDataset.source(source).map(lambda ex: ex["dicom_id"].decode())
    assert sorted(ids) == ["d101a", "d121a", "d121b", "d91a"]
    # A reader without this module's class: the files alone describe the dataset.
    builder = tfds.builder_from_directory(f"{built[1]}/{NAME}/stage1/1.0.0")
    assert len(builder.as_data_source(split="train")) == 11
    meta = builder.info.metadata   # corpus.summary() of the build
    assert meta["stage1"] == 11 and "unreadable image" not in meta["skipped"]
    jpeg_meta = tfds.builder_from_directory(f"{built[1]}/{NAME}/stage2_jpeg/1.0.0").info.metadata
    assert jpeg_meta["skipped"]["unreadable image"] == 1 and jpeg_meta["stage2"] == 3


def test_colour_or_png_images_are_stored_as_grey_jpeg(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "c.png")
    out = Image.open(io.BytesIO(tm._grey_jpeg(str(tmp_path / "c.png"))))
    assert (out.format, out.mode, out.size) == ("JPEG", "L", (8, 8))
    assert abs(int(np.asarray(out).mean()) - round(0.299 * 200)) <= 2


def test_missing_manual_dir_shows_instructions(tmp_path):
    builder = tm.MimicCxrJpg(config="stage2", data_dir=str(tmp_path))
    with pytest.raises(AssertionError, match="physionet"):
        builder.download_and_prepare()
    with pytest.raises(FileNotFoundError, match="split.csv"):
        tm.build(tmp_path, tmp_path / "out", "stage2")
