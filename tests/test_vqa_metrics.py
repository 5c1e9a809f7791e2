"""VQA score: normalisation, the presence rule, per-type fractions."""
import math

import pytest

from llmcxr_jax.eval import vqa_metrics as V


def test_answers_are_compared_after_normalisation():
    assert V.answer_is_right("Right lower lobe", "right lower lobe.", "location")
    assert V.answer_is_right("The right lower lobe.", "Right lower lobe.", "location")
    assert not V.answer_is_right("Left lower lobe.", "Right lower lobe.", "location")
    assert not V.answer_is_right("Right.", "Right lower lobe.", "location")
    assert V.answer_is_right("Yes, there is a small effusion.", "Yes.", "presence")
    assert not V.answer_is_right("No.", "Yes.", "presence")
    assert not V.answer_is_right("", "Mild.", "severity")


def test_scores_per_type():
    preds = ["Yes.", "No.", "Mild.", "Left.", "Large."]
    refs = ["Yes.", "Yes.", "Mild.", "Right.", "Large."]
    types = ["presence", "presence", "severity", "location", None]
    s = V.vqa_scores(preds, refs, types)
    assert s["all"] == {"score": 0.6, "count": 5}
    assert s["presence"]["score"] == 0.5 and s["severity"]["score"] == 1.0
    assert s["location"]["score"] == 0.0 and s["other"]["count"] == 1
    assert not any(math.isnan(v["score"]) for v in s.values())
    with pytest.raises(ValueError, match="equally many"):
        V.vqa_scores(preds, refs[:2], types)
