"""CXR-VQA score by question type. LLM-CXR reports one "score"; its exact rule was not released,
so ours is stated here: an answer is right when its normalised tokens (lowercase, punctuation and
the articles a/an/the dropped) equal the reference's, or, for presence questions, when its first
token is the reference's yes/no. Scores are the fraction right, per type and over all questions.
"""
from __future__ import annotations

from collections.abc import Sequence

from llmcxr_jax.errors import UsageError
from llmcxr_jax.eval.report_metrics import tokenize

ARTICLES = frozenset({"a", "an", "the"})


def normalise(answer: str) -> tuple[str, ...]:
    return tuple(t for t in tokenize(answer) if t not in ARTICLES)


def answer_is_right(prediction: str, reference: str, question_type: str | None) -> bool:
    pred, ref = normalise(prediction), normalise(reference)
    if question_type == "presence" and ref and ref[0] in ("yes", "no"):
        return bool(pred) and pred[0] == ref[0]
    return bool(ref) and pred == ref


def vqa_scores(predictions: Sequence[str], references: Sequence[str],
               question_types: Sequence[str | None]) -> dict[str, dict[str, float]]:
    """-> {"all": {"score", "count"}, TYPE: {"score", "count"}, ...}; a type of None counts as "other"."""
    if not len(predictions) == len(references) == len(question_types):
        raise UsageError(f"{len(predictions)} predictions, {len(references)} references and "
                         f"{len(question_types)} question types must be equally many")
    hits: dict[str, list[bool]] = {"all": []}
    for p, r, q in zip(predictions, references, question_types):
        ok = answer_is_right(p, r, q)
        hits["all"].append(ok)
        hits.setdefault(q or "other", []).append(ok)
    return {k: {"score": (sum(v) / len(v)) if v else float("nan"), "count": len(v)} for k, v in hits.items()}
