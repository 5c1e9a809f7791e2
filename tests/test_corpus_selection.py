"""The reader's stage 1 / stage 2 / evaluation selections on a synthetic corpus equal counts
derived independently from the corpus plan (subjects, dated studies, views) and the raw report
files: stage 2 and evaluation take each subject's earliest study (its first: dates increase)."""
import os

import pytest

from llmcxr_jax import synthetic
from llmcxr_jax.data import mimic_cxr


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synth") / "corpus")
    synthetic.synthesize(root, num_images=160, image_size=32, seed=5)
    return root


def _report(root, subject, study):
    path = os.path.join(root, "reports", "files", f"p{subject.subject_id[:2]}", f"p{subject.subject_id}",
                        f"s{study.study_id}.txt")
    with open(path) as f:
        return f.read()


def test_selections_match_the_plan(corpus_root):
    plan = synthetic.plan_corpus(160, 5)
    expect = {"stage1": set(), "stage2": set(), "evaluation": set()}
    for subject in plan:
        for n, study in enumerate(subject.studies):
            text = _report(corpus_root, subject, study)
            has_impression = "IMPRESSION:" in text
            for image in study.images:
                if subject.split == "train" and (has_impression or "FINDINGS:" in text):
                    expect["stage1"].add(image.dicom_id)
                if n == 0 and image.view in ("PA", "AP") and has_impression:
                    expect["stage2" if subject.split == "train" else "evaluation"].add(image.dicom_id)
    corpus = mimic_cxr.load_corpus(corpus_root, progress=False)
    got = {"stage1": {r.dicom_id for r in mimic_cxr.stage_records(corpus, 1)},
           "stage2": {r.dicom_id for r in mimic_cxr.stage_records(corpus, 2)},
           "evaluation": {r.dicom_id for r in mimic_cxr.evaluation_records(corpus)}}
    for name in expect:
        assert got[name] == expect[name], name
    assert all(expect.values())
    # the earliest study is the one chosen: every selected image is from its subject's first study
    firsts = {s.subject_id: s.studies[0].study_id for s in plan}
    assert all(r.study_id == firsts[r.subject_id] for r in mimic_cxr.stage_records(corpus, 2))
    skipped = corpus.skipped_counts()
    assert set(skipped) <= {mimic_cxr.NO_SECTIONS, mimic_cxr.NO_IMPRESSION}, skipped


def test_shipped_format_lists_of_our_selection_give_the_same_records(corpus_root, tmp_path):
    """Our rebuilt selection written as LLM-CXR ships its lists (a dict keyed by dicom id, a list) and read back
    through data/original_recipe.py selects the same stage-2, VQA and evaluation images, none reported absent."""
    import pickle

    from llmcxr_jax.data import original_recipe

    rebuilt = mimic_cxr.load_corpus(corpus_root, progress=False)
    with open(tmp_path / "selected.pickle", "wb") as f:
        pickle.dump({i: {"ViewPosition": "PA"} for i in rebuilt.selected_pa_ap_earliest}, f)
    with open(tmp_path / "eval.pickle", "wb") as f:
        pickle.dump([r.dicom_id for r in rebuilt.evaluation], f)
    given = mimic_cxr.load_corpus(
        corpus_root, progress=False,
        pa_ap_earliest=original_recipe.read_id_list(str(tmp_path / "selected.pickle"), "stage2_list"),
        evaluation_ids=original_recipe.read_id_list(str(tmp_path / "eval.pickle"), "eval_list"))
    for pick in (lambda c: c.stage2, lambda c: c.evaluation, mimic_cxr.vqa_image_records):
        assert [r.dicom_id for r in pick(given)] == [r.dicom_id for r in pick(rebuilt)]
    assert given.list_report() == {
        "stage2_list": {"listed": len(rebuilt.selected_pa_ap_earliest), "not_in_corpus": 0, "not_in_corpus_first": []},
        "eval_list": {"listed": len(rebuilt.evaluation), "not_in_corpus": 0, "not_in_corpus_first": []}}
