"""What `llmcxr evaluate` shows in TensorBoard (OUT/tensorboard), all at the evaluated checkpoint's step: its
metrics as scalars, real CXRs over the generated ones, sample reports and VQA answers beside their references as
text, and the command's inputs and options as hparams."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from llmcxr_jax.train import tensorboard

SAMPLE_ROWS = 8  # rows of the reports / answers tables (the first evaluation images, in metrics order)
# the headline numbers the HParams tab compares runs by (a task that did not run leaves its column empty)
HEADLINE = ("report/labels/f1_micro", "report/text/bleu_4", "report/text/rouge_l", "image/fid_classifier",
            "vqa/all/score", "vqgan/psnr")
# metrics.json subtrees that are not scores: settings (they are the hparams), per-image retry counts
NOT_SCALARS = ("options", "protocol", "retries_per_image")


def open_board(out: str, inputs: dict[str, str], opts) -> tensorboard.Board:
    """OUT/tensorboard with the inputs (checkpoint, VQ-GAN, data) and every EvalOptions field as hparams."""
    board = tensorboard.Board(os.path.join(out, "tensorboard"))
    board.hparams(tensorboard.flatten({**inputs, **dataclasses.asdict(opts)}), HEADLINE)
    return board


def log_metrics(board: tensorboard.Board, step: int, metrics: dict[str, Any]) -> None:
    """Every number of metrics.json (chance baselines under baselines/...) as a scalar at `step`."""
    board.scalars(step, tensorboard.numeric_leaves(metrics, skip=NOT_SCALARS))


def log_reports(board: tensorboard.Board, step: int, dicom_ids: Sequence[str], references: Sequence[str],
                generated: Sequence[str]) -> None:
    rows = list(zip(dicom_ids, references, generated))[:SAMPLE_ROWS]
    board.text("reports", step, tensorboard.markdown_table(("dicom_id", "reference", "generated"), rows))


def log_answers(board: tensorboard.Board, step: int, examples: Sequence, answers: Sequence[str]) -> None:
    """examples: text_corpora VQA examples (dicom_id, question, answer) in the order of `answers`."""
    rows = [(e.dicom_id, e.question, e.answer, a) for e, a in zip(examples, answers)][:SAMPLE_ROWS]
    board.text("vqa", step, tensorboard.markdown_table(("dicom_id", "question", "reference", "generated"), rows))


def log_images(board: tensorboard.Board, step: int, real: np.ndarray, fake: np.ndarray, columns: int) -> None:
    """The first `columns` real CXRs over the ones generated from their reports (0 columns: none)."""
    if columns:
        board.image("real_vs_generated", step, [real[:columns], fake[:columns]])
