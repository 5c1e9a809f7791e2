"""A gs:// workdir: config.json, metrics.jsonl, TensorBoard event files, PNG grids, the tokenizer and the
checkpoint look-ups all go through etils.epath. A fake bucket (epath's mock backend serving gs://bucket/...
from a local folder, refusing append as GCS does) stands in for GCS. orbax reads and writes arrays through
tensorstore's own GCS driver, which cannot run offline: a gs:// save or array restore is not tested here."""
import os

import ml_collections
import numpy as np
import pytest
from etils.epath import testing as epath_testing
from orbax.checkpoint._src.path import gcs_utils
from PIL import Image

from llmcxr_jax import checkpoint, storage, vocab
from llmcxr_jax.train import tensorboard
from llmcxr_jax.train.metrics import MetricsLog, claim_workdir, read_metrics, save_image_grid

RUN = "gs://bucket/runs/a"


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """-> (local folder holding the bucket's objects, [(call, path, mode)] of every epath call)."""
    root, calls = tmp_path / "gcs", []
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")

    def local(p):
        p = os.fspath(p)
        return os.path.join(root, p[len("gs://"):]) if p.startswith("gs://") else p

    def fake(name):
        def fn(original, p, *args, **kwargs):
            mode = args[0] if name == "open" else None
            calls.append((name, os.fspath(p), mode))
            if name == "open" and os.fspath(p).startswith("gs://"):
                if "a" in mode:
                    raise OSError(f"{p}: GCS objects cannot be appended to")
                if "w" in mode:  # an object needs no folder
                    os.makedirs(os.path.dirname(local(p)), exist_ok=True)
            if name in ("rename", "replace", "copy"):
                args = (local(args[0]),) + args[1:]
            return original(local(p), *args, **kwargs)
        return fn

    # the packages gs:// needs stand installed; orbax asks the bucket (google-cloud-storage) whether it has a
    # hierarchical namespace: this one is flat
    monkeypatch.setattr(storage, "require_packages", lambda scheme: None)
    monkeypatch.setattr(gcs_utils, "get_bucket", lambda name: type("Bucket", (), {"name": name})())
    names = ("copy", "exists", "glob", "isdir", "listdir", "makedirs", "mkdir", "open", "remove", "rename",
             "replace", "rmtree", "stat", "walk")
    with epath_testing.mock_epath(**{n: fake(n) for n in names}):
        yield root, calls
    assert not os.path.exists(tmp_path / "cwd" / "gs:"), "a gs:// path was written as a local folder"


def test_claim_workdir_writes_and_checks_config_in_the_bucket(bucket):
    root, _ = bucket
    config = ml_collections.ConfigDict({"model": {"width": 8}, "train": {"steps": 3}})
    claim_workdir(RUN, config, {"model": "model"})
    assert (root / "bucket/runs/a/config.json").is_file()
    config.train.steps = 5
    claim_workdir(RUN, config, {"model": "model"})  # a resume may change what is not checked
    config.model.width = 16
    with pytest.raises(ValueError, match="different model"):
        claim_workdir(RUN, config, {"model": "model"})


def test_metrics_log_rewrites_the_object_and_appends_locally(bucket, tmp_path):
    root, calls = bucket
    log = MetricsLog(RUN, 10)
    log.write(1, {"loss": 2.0}, echo=False)
    log.write(2, {"loss": 1.5}, echo=False)
    MetricsLog(RUN, 10).write(3, {"loss": 1.0}, echo=False)  # a resumed run keeps the earlier lines
    assert [r["step"] for r in read_metrics(f"{RUN}/metrics.jsonl")] == [1, 2, 3]
    assert len((root / "bucket/runs/a/metrics.jsonl").read_text().splitlines()) == 3
    local = str(tmp_path / "local_run")
    os.makedirs(local)
    calls.clear()
    MetricsLog(local, 10).write(1, {"loss": 2.0}, echo=False)
    assert calls == [("open", os.path.join(local, "metrics.jsonl"), "a")]  # no read, no rewrite


def test_board_writes_into_the_bucket_at_every_call(bucket, monkeypatch):
    """Each call is in the bucket when it returns (a staged local file uploaded whole, never appended); past
    ROTATE_BYTES the board starts a new object, and TensorBoard reads the objects as one run."""
    from board_helpers import read_board, text_tags

    root, _ = bucket
    folder = root / "bucket/runs/a/tensorboard"
    board = tensorboard.Board(f"{RUN}/tensorboard")
    assert board.path.startswith(f"{RUN}/tensorboard/events.out.tfevents.")
    board.hparams({"train.steps": 3}, ["loss"])
    board.scalars(1, {"loss": 2.0})
    assert [e.step for e in read_board(folder).Scalars("loss")] == [1]  # before any close
    monkeypatch.setattr(tensorboard, "ROTATE_BYTES", 1)  # every call from here on ends its object
    board.image("reconstructions", 2, [np.zeros((2, 4, 4, 1)), np.ones((2, 4, 4, 1))])
    board.text("samples", 2, "a report")
    board.scalars(2, {"loss": 1.5, "lr": 0.1})
    board.scalars(3, {"loss": 1.0})
    board.close()
    assert len(os.listdir(folder)) == 5  # the first object, then one per call after the rotation
    acc = read_board(folder)
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 2.0), (2, 1.5), (3, 1.0)]
    assert acc.Tags()["images"] == ["reconstructions"] and text_tags(acc) == {"samples/text_summary"}


def test_image_grid_and_tokenizer_in_the_bucket(bucket):
    from tokenizers import Tokenizer, models

    root, _ = bucket
    rows = [np.zeros((2, 4, 4, 1), np.float32), np.ones((2, 4, 4, 1), np.float32)]
    save_image_grid(f"{RUN}/images/grid.png", rows)
    assert Image.open(root / "bucket/runs/a/images/grid.png").size == (8, 8)
    tok = Tokenizer(models.WordLevel({"<eos>": 0, "a": 1}, unk_token="<eos>"))
    vocab.save_tokenizer(tok, {"eos_token": "<eos>"}, f"{RUN}/checkpoints/tokenizer")
    assert vocab.has_tokenizer(f"{RUN}/checkpoints/tokenizer") and not vocab.has_tokenizer(f"{RUN}/none")
    loaded, special, _ = vocab.load_tokenizer(f"{RUN}/checkpoints/tokenizer")
    assert special.eos_id == 0 and vocab.text_size(loaded) == 2 + len(vocab.DOLLY_SPECIAL_TOKENS)


def test_checkpoint_lookups_in_the_bucket(bucket):
    """A run's checkpoint saved to disk, then seen through gs://: resume detection and metadata go through
    epath (orbax's arrays would go through tensorstore's GCS driver: not offline)."""
    root, _ = bucket
    assert not checkpoint.has_checkpoint(f"{RUN}/checkpoints")
    checkpoint.save_state(str(root / "bucket/runs/a/checkpoints"), {"params": {"w": np.arange(3.0)}},
                          {"note": "x"}, step=7)
    assert checkpoint.has_checkpoint(f"{RUN}/checkpoints")
    assert checkpoint.latest_step(f"{RUN}/checkpoints") == 7
    assert checkpoint.read_metadata(f"{RUN}/checkpoints")["note"] == "x"


def test_missing_gcs_packages_are_one_line_naming_them(monkeypatch):
    monkeypatch.setattr(storage, "_installed", lambda module: False)
    storage.require_packages.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"^gs:// paths need gcsfs and google-cloud-storage; pip install gcsfs "
                                             r"google-cloud-storage \(or llmcxr-jax\[gcs\]\) on every host$"):
            claim_workdir(RUN, ml_collections.ConfigDict({"model": {}}), {})
        assert storage.path("runs/a") == storage.path(os.path.abspath("runs/a"))  # local paths need neither
    finally:
        storage.require_packages.cache_clear()


def test_vqgan_init_from_a_ckpt_in_the_bucket(bucket):
    """train-vqgan's train.init_from may be a gs:// taming .ckpt: it is copied to a local temp file for torch."""
    from flax import nnx

    from llmcxr_jax import configs, sharding
    from llmcxr_jax.convert import taming_vqgan
    from llmcxr_jax.models.vqgan import VQGANConfig, init_vqgan
    from llmcxr_jax.train import vqgan as train_vqgan

    root, _ = bucket
    cfg = configs.load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "vqgan_f16_1024.py:tiny"),
                              ["model.resolution=16", "model.ch_mult=(1,2)", "model.attn_resolutions=()"])
    source = init_vqgan(VQGANConfig(**cfg.model), seed=5)
    os.makedirs(root / "bucket/models")
    taming_vqgan.write_ckpt(source, str(root / "bucket/models/v.ckpt"))
    cfg.train.init_from = "gs://bucket/models/v.ckpt"
    start = train_vqgan.initial_weights(cfg, sharding.make_mesh("-1,1,1"))
    assert set(start) == {"gen"}  # no loss.discriminator.* in this file
    want = nnx.state(source, nnx.Param).to_pure_dict()
    np.testing.assert_array_equal(start["gen"]["quantize"]["embedding"], want["quantize"]["embedding"])
    cfg.train.init_from = "gs://bucket/models/none.ckpt"
    with pytest.raises(FileNotFoundError, match="gs://bucket/models/none.ckpt does not exist"):
        train_vqgan._check(cfg, sharding.make_mesh("-1,1,1"))
