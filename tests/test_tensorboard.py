"""train/tensorboard.Board read back by TensorBoard's own reader (EventAccumulator): scalars exactly, the image grid
pixel for pixel, text, hparams; a resumed run shows each step once; processes other than 0 write nothing. The runs
of train, train-vqgan and evaluate are read the same way in their own tests (test_lm_train, test_vqgan_train,
test_evaluate), the gs:// board in test_gcs_workdir."""
import io
import os
import subprocess
import sys

import jax
import numpy as np
from board_helpers import hparam_metrics, hparams, read_board, text, text_tags
from PIL import Image

from llmcxr_jax.train import tensorboard
from llmcxr_jax.train.metrics import grid_pixels


def test_what_a_board_writes_tensorboard_reads(tmp_path):
    rows = [np.linspace(-1, 1, 2 * 4 * 5).reshape(2, 4, 5, 1), -np.ones((2, 4, 5, 1))]
    with tensorboard.Board(str(tmp_path)) as board:
        board.hparams(tensorboard.flatten({"train": {"learning_rate": 1e-4, "mesh": "1,-1,1", "remat": False},
                                           "model": {"layers": np.int64(2), "ch_mult": (1, 2), "none": None}}),
                      ["loss", "eval_loss"])
        written = {1: {"loss": 2.5, "lr": 1e-4}, 7: {"loss": 0.5, "grad_norm": 3.25}, 300: {"loss": 0.125}}
        for step, values in written.items():
            board.scalars(step, {**values, "histogram": np.zeros(3), "name": "not a number"})
        board.image("reconstructions", 7, rows)
        board.text("samples", 7, "| a | b |\n|---|---|\n| 1 | 2 |")
    assert os.path.basename(board.path).startswith("events.out.tfevents.") and os.listdir(tmp_path) == [
        os.path.basename(board.path)]
    acc = read_board(tmp_path)
    tags = acc.Tags()
    assert sorted(tags["scalars"]) == ["grad_norm", "loss", "lr"] and tags["images"] == ["reconstructions"]
    for tag in tags["scalars"]:
        want = [(step, np.float32(values[tag])) for step, values in written.items() if tag in values]
        assert [(e.step, np.float32(e.value)) for e in acc.Scalars(tag)] == want, tag
    (image,) = acc.Images("reconstructions")
    assert image.step == 7 and (image.height, image.width) == (8, 10)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string))), grid_pixels(rows))
    assert text_tags(acc) == {"samples/text_summary"}
    assert text(acc, "samples/text_summary") == [(7, "| a | b |\n|---|---|\n| 1 | 2 |")]
    assert hparams(acc) == {"train.learning_rate": 1e-4, "train.mesh": "1,-1,1", "train.remat": False,
                            "model.layers": 2.0, "model.ch_mult": "(1, 2)", "model.none": "None"}
    assert hparam_metrics(acc) == ["loss", "eval_loss"]


def test_a_resumed_run_shows_each_step_once(tmp_path):
    """The first attempt logged steps 1-5 and saved at 3; the resumed one logs 4-6 again in a new file."""
    with tensorboard.Board(str(tmp_path)) as first:
        for step in range(1, 6):
            first.scalars(step, {"loss": float(step)})
        first.image("grid", 5, [np.zeros((1, 2, 2, 1))])
    with tensorboard.Board(str(tmp_path), purge_from=4) as resumed:
        for step in range(4, 7):
            resumed.scalars(step, {"loss": 10.0 + step})
    assert len(os.listdir(tmp_path)) == 2
    acc = read_board(tmp_path)
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1), (2, 2), (3, 3), (4, 14), (5, 15), (6, 16)]
    assert acc.Images("grid") == []  # logged by the attempt after its checkpoint: hidden


def test_only_process_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with tensorboard.Board(str(tmp_path / "tb")) as board:
        board.hparams({"a": 1}, ["loss"])
        board.scalars(1, {"loss": 1.0})
        board.image("grid", 1, [np.zeros((1, 2, 2, 1))])
        board.text("samples", 1, "text")
    assert not (tmp_path / "tb").exists() and board.path is None


def test_a_board_leaves_torch_unimported(tmp_path):
    """tensorboardX's writer tries `import torch` (seconds, and CUDA libraries on a GPU host): a JAX process that
    logs to TensorBoard goes without it, and no stand-in is left to stop a later `import torch`."""
    code = ("import sys; from llmcxr_jax.train import tensorboard; board = tensorboard.Board(sys.argv[1]); "
            "board.scalars(1, {'loss': 1.0}); board.close(); assert 'tensorboardX' in sys.modules; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [e.step for e in read_board(tmp_path).Scalars("loss")] == [1]


def test_flatten_leaves_and_tables():
    assert tensorboard.flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": (1, 2)}) == {"a.b": 1, "a.c.d": "x", "e": (1, 2)}
    metrics = {"n_images": 3, "report": {"labels": {"f1_micro": 0.5, "f1_micro_ci": [0.4, 0.6]}}, "ok": True,
               "options": {"seed": 0}, "name": "x", "nan": float("nan")}
    leaves = tensorboard.numeric_leaves(metrics, skip=("options",))
    assert set(leaves) == {"n_images", "report/labels/f1_micro", "nan"} and np.isnan(leaves["nan"])
    assert leaves["report/labels/f1_micro"] == 0.5
    table = tensorboard.markdown_table(("id", "text"), [("a", "left | right\nnext line"), ("b", "")])
    assert table.splitlines() == ["| id | text |", "|---|---|", "| a | left \\| right next line |", "| b |   |"]


def test_held_out_predictions_table():
    """Two examples packed in one row, then padding: prompts end at the last token before the response; image
    spans follow the reference's and count exact codes; an image id predicted in text shows as such."""
    from llmcxr_jax.train import lm_samples
    from llmcxr_jax.vocab import VocabLayout

    class Letters:  # token i is the letter chr(97 + i)
        def decode(self, ids, skip_special_tokens):
            assert not skip_special_tokens
            return "".join(chr(97 + i) for i in ids)

    layout = VocabLayout.create(text_size=20, image_codes=4)  # image tokens 20..23
    # example 1: prompt a b, response c [20 21] d | example 2: prompt d e, response f g | padding
    ids = np.array([0, 1, 2, 20, 21, 3, 4, 5, 6, 0])
    targets = np.array([1, 2, 20, 21, 3, 9, 5, 6, 9, 0])
    mask = np.array([0, 1, 1, 1, 1, 0, 1, 1, 0, 0], np.float32)
    segments = np.array([1, 1, 1, 1, 1, 2, 2, 2, 0, 0])
    predicted = np.array([7, 2, 20, 22, 3, 7, 22, 6, 7, 7])
    row = {"input_ids": ids, "targets": targets, "loss_mask": mask, "segment_ids": segments, "predictions": predicted}
    assert set(row) == {*lm_samples.ROW_KEYS, "predictions"}
    assert lm_samples.markdown(row, Letters(), layout).splitlines() == [
        "| prompt | reference response | teacher-forced prediction | tokens right |", "|---|---|---|---|",
        "| ab | c[2 image tokens]d | c[2 image tokens, 1 as the reference]d | 75.0% |",
        "| de | fg | [image token]g | 50.0% |"]
