"""MIMIC-CXR-JPG reading on a hand-made corpus (tests/mimic_fixture.py): stage selections with
exact counts, LLM-CXR's report split, skipped-record accounting, VQA / Dolly / CheXpert readers."""
import gzip
import json
import shutil

import mimic_fixture as fx
import pytest

from llmcxr_jax.data import mimic_cxr as mc


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return fx.write_corpus(tmp_path_factory.mktemp("mimic"))


@pytest.fixture(scope="module")
def corpus(root):
    return mc.load_corpus(root, progress=False)


def _ids(records):
    return [r.dicom_id for r in records]


def _llmcxr_text(text, stage):
    """LLM-CXR's two report parsers restated from their description (None where they raise)."""
    joined = " ".join(line.strip() for line in text.split("\n") if line.strip())
    parts = joined.split("IMPRESSION:")
    impression = parts[1].strip() if len(parts) == 2 else None
    if stage == 2:
        return impression
    parts = joined.split("FINDINGS:")
    if len(parts) != 2:
        return impression
    rest = parts[1].strip().split("IMPRESSION:")
    return rest[0].strip() + " " + rest[1].strip() if len(rest) == 2 else parts[1].strip()


def test_stage_and_evaluation_selections(corpus):
    # stage 1: every train image with a file and findings or impression (laterals and unknown views too)
    assert _ids(mc.stage_records(corpus, 1)) == ["d11a", "d11b", "d12a", "d12b", "d12c", "d13a", "d21a", "d21b",
                                                 "d31a", "d61b", "d71a"]
    # stage 2: PA/AP of the earliest PA/AP study (s50000012 at 09:05:12, not s50000011 at 21:30:14 the
    # same day nor the older lateral-only s50000013); d31a lacks an impression, d61a its file
    assert _ids(mc.stage_records(corpus, 2)) == ["d12a", "d12b", "d21a", "d71a"]
    # evaluation: validate + test, PA/AP, earliest study, impression present (d111a has none)
    assert _ids(mc.evaluation_records(corpus)) == ["d91a", "d101a", "d121a", "d121b"]
    assert {r.split for r in mc.evaluation_records(corpus)} == {"validate", "test"}
    assert corpus.summary() == {
        "root": str(corpus.root), "images_listed": 25, "records": 20,
        "records_per_split": {"train": 11, "test": 5, "validate": 4},
        "selected_pa_ap_earliest": 13, "stage1": 11, "stage2": 4, "evaluation": 4,
        "skipped": {"duplicate dicom_id": 1, "image file missing": 1, "missing report": 1,
                    "no findings or impression": 1, "no impression": 2, "not in metadata": 1,
                    "not in split csv": 1, "unknown split": 1}}
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        mc.stage_records(corpus, 3)


def test_record_fields_and_golden_report(corpus):
    rec = {r.dicom_id: r for r in corpus.records}["d12a"]
    assert (rec.subject_id, rec.study_id, rec.split, rec.view) == ("10000001", "50000012", "train", "PA")
    assert (rec.study_date, rec.study_time) == ("21800506", "90512.0")
    assert rec.image_path == str(corpus.root / "files/p10/p10000001/s50000012/d12a.jpg")
    assert (rec.findings, rec.impression) == (fx.GOLDEN_FINDINGS, fx.GOLDEN_IMPRESSION)
    assert mc.stage_text(rec, 1) == fx.GOLDEN_FINDINGS + " " + fx.GOLDEN_IMPRESSION
    assert mc.stage_text(rec, 2) == fx.GOLDEN_IMPRESSION
    d21a, d31a = (next(r for r in corpus.records if r.dicom_id == d) for d in ("d21a", "d31a"))
    assert (d21a.findings, mc.stage_text(d21a, 1)) == (None, "Small left effusion.")      # no FINDINGS
    assert (d31a.impression, mc.stage_text(d31a, 1)) == (None, "Right lower lobe opacity.")  # no IMPRESSION
    assert mc.stage_text(d31a, 2) is None


@pytest.mark.parametrize("text", list(fx.REPORTS.values()) + [
    "FINDINGS: a\n IMPRESSION: b\n IMPRESSION: c",      # two impressions: findings take all the rest
    "FINDINGS: a\r\nmore\r\n\r\nIMPRESSION: b",         # CRLF
    "FINDINGS: a FINDINGS: b IMPRESSION: c",            # two findings: impression alone
    "IMPRESSION: only\n\n",
])
def test_parse_matches_llmcxr(text):
    findings, impression = mc.parse_report(text)
    rec = mc.CxrRecord("d", "1", "2", "train", "PA", "", "", "", findings, impression)
    for stage in (1, 2):
        expected = _llmcxr_text(text.replace("\r\n", "\n"), stage)
        assert mc.stage_text(rec, stage) == (expected or None), (stage, text)


def test_parse_report_sections():
    assert mc.parse_report(fx.GOLDEN_REPORT) == (fx.GOLDEN_FINDINGS, fx.GOLDEN_IMPRESSION)
    assert mc.parse_report("FINDINGS: a b\n IMPRESSION: c\n IMPRESSION: d") == ("a b IMPRESSION: c IMPRESSION: d", None)
    assert mc.parse_report("FINDINGS: a FINDINGS: b IMPRESSION: c") == (None, "c")
    assert mc.parse_report("FINDINGS: a\nIMPRESSION:\n\n") == ("a", None)   # empty section = missing
    assert mc.parse_report("WET READ: nothing") == (None, None)


@pytest.mark.parametrize("text", [
    " FINAL REPORT\n IMPRESSION:\n \n Small left effusion.\n \n FINDINGS:\n \n Blunted left costophrenic angle.\n",
    "IMPRESSION: Small left effusion. FINDINGS: Blunted left costophrenic angle.",
])
def test_impression_before_findings_gives_each_section_once_without_headers(text):
    """LLM-CXR's parser keeps "... FINDINGS: <findings>" inside such an impression and drops the impression
    from the stage-1 text; ours ends the impression where FINDINGS begins."""
    findings, impression = mc.parse_report(text)
    assert (findings, impression) == ("Blunted left costophrenic angle.", "Small left effusion.")
    rec = mc.CxrRecord("d", "1", "2", "train", "PA", "", "", "", findings, impression)
    stage1 = mc.stage_text(rec, 1)
    assert stage1 == "Blunted left costophrenic angle. Small left effusion."
    for header in ("FINDINGS:", "IMPRESSION:"):
        assert header not in stage1 and header not in mc.stage_text(rec, 2)
    # what the original made of it (restated in _llmcxr_text): the impression lost, the header kept
    assert _llmcxr_text(text, 1) == "Blunted left costophrenic angle."
    assert "FINDINGS:" in _llmcxr_text(text, 2)


def test_earliest_study_compares_times_as_numbers():
    rows = [("late", "1", "s1", "PA", "21800506", "213014.531"),   # '213014.531' < '90512.0' as strings
            ("early", "1", "s2", "AP", "21800506", "90512.0"),
            ("early_lat", "1", "s2", "LATERAL", "21800506", "90512.0"),
            ("older_lat", "1", "s3", "LL", "21700101", "1"),
            ("other", "2", "s9", "PA", "", "")]
    assert mc.earliest_frontal(rows) == {"early", "other"}


def test_check_images_skips_corrupt_jpeg(root):
    corpus = mc.load_corpus(root, check_images=True, progress=False)
    bad = [s for s in corpus.skipped if s.reason == mc.UNREADABLE_IMAGE]
    assert [s.dicom_id for s in bad] == ["d71a"] and "d71a.jpg" in bad[0].detail
    assert (len(mc.stage_records(corpus, 1)), len(mc.stage_records(corpus, 2))) == (10, 3)
    assert "d71a" not in _ids(corpus.records)


def test_write_skipped(corpus, tmp_path):
    path = corpus.write_skipped(tmp_path)
    assert path == tmp_path / "skipped.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(set(r) == {"dicom_id", "subject_id", "study_id", "reason", "detail"} for r in rows)
    assert sorted((r["dicom_id"], r["reason"]) for r in rows) == sorted([
        ("d12a", "duplicate dicom_id"), ("d99a", "not in split csv"), ("d81a", "not in metadata"),
        ("d21z", "unknown split"), ("d41a", "no findings or impression"), ("d51a", "missing report"),
        ("d61a", "image file missing"), ("d31a", "no impression"), ("d111a", "no impression")])
    d51a = next(r for r in rows if r["dicom_id"] == "d51a")
    assert (d51a["subject_id"], d51a["study_id"]) == ("13000005", "50000051")
    assert d51a["detail"].endswith("reports/files/p13/p13000005/s50000051.txt")


def test_missing_inputs_name_what_to_provide(root, tmp_path):
    copy = shutil.copytree(root, tmp_path / "c")
    shutil.rmtree(copy / "reports")
    with pytest.raises(FileNotFoundError, match="mimic-cxr-reports.zip .*reports_root"):
        mc.load_corpus(copy, progress=False)
    (copy / "mimic-cxr-2.0.0-metadata.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"mimic-cxr-2\.0\.0-metadata\.csv .*physionet"):
        mc.load_corpus(copy, progress=False)
    (copy / "mimic-cxr-2.0.0-split.csv.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"mimic-cxr-2\.0\.0-split\.csv"):
        mc.load_corpus(copy, progress=False)
    with pytest.raises(FileNotFoundError, match="chexpert"):
        mc.read_chexpert_labels(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        mc.load_corpus(tmp_path / "nowhere", progress=False)


def test_gzipped_metadata_and_bad_header(root, tmp_path):
    copy = shutil.copytree(root, tmp_path / "c")
    plain = copy / "mimic-cxr-2.0.0-metadata.csv"
    with gzip.open(copy / "mimic-cxr-2.0.0-metadata.csv.gz", "wt") as f:
        f.write(plain.read_text())
    plain.unlink()
    assert mc.load_corpus(copy, progress=False).summary()["stage2"] == 4
    with gzip.open(copy / "mimic-cxr-2.0.0-split.csv.gz", "wt") as f:
        f.write("dicom_id,study_id,subject_id\nd1,2,3\n")
    with pytest.raises(ValueError, match=r"split\.csv\.gz lacks columns \['split'\]"):
        mc.load_corpus(copy, progress=False)


def test_reports_root_outside_the_image_root(tmp_path):
    root = fx.write_corpus(tmp_path / "jpg", reports_root=tmp_path / "mimic-cxr-reports")
    with pytest.raises(FileNotFoundError):
        mc.load_corpus(root, progress=False)
    corpus = mc.load_corpus(root, reports_root=tmp_path / "mimic-cxr-reports", progress=False)
    assert (len(corpus.stage1), len(corpus.stage2), len(corpus.evaluation)) == (11, 4, 4)


def test_vqa_reader_is_safe_and_counts_bad_input(root, corpus):
    pwned = root / "PWNED"
    vqa = mc.read_vqa(root)
    assert not pwned.exists()   # the __import__('os') file was refused, not run
    assert [(q.study_id, q.question_type) for q in vqa.items] == [
        ("50000012", "presence"), ("50000012", "location"), ("50000021", None), ("50000091", "presence")]
    assert vqa.skipped == {"not a python literal": 2, "not a list": 1, "not at pSUBJECT/sSTUDY.txt": 1,
                           "item not a dict": 1, "item without question and answer strings": 1}
    assert any("s50000041.txt" in s["where"] and "Call" in s["detail"] for s in vqa.skipped_items)
    # LLM-CXR pairs each question with each PA/AP earliest-study image of its study
    train = mc.vqa_for_records(vqa, mc.vqa_image_records(corpus))
    assert [(e.dicom_id, e.answer) for e in train] == [("d12a", "No."), ("d12b", "No."), ("d12a", "None."),
                                                       ("d12b", "None."), ("d21a", "Yes, small.")]
    test = mc.vqa_for_records(vqa, mc.vqa_image_records(corpus, mc.EVAL_SPLITS))
    assert [(e.dicom_id, e.question) for e in test] == [("d91a", "Is there edema?")]
    with pytest.raises(FileNotFoundError, match="medvqa"):
        mc.read_vqa(root / "files")


def test_dolly_reader_counts_bad_rows(root):
    dolly = mc.read_dolly(root / "databricks-dolly-15k.jsonl")
    assert dolly.items == [
        {"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"},
        {"instruction": "Add 2 and 2.", "context": "", "response": "4", "category": ""}]
    assert dolly.skipped == {"missing instruction or response": 2, "not json": 1, "not a json object": 1}
    with pytest.raises(FileNotFoundError, match="dolly"):
        mc.read_dolly(root / "nope.jsonl")


def test_chexpert_labels(root, tmp_path):
    assert mc.CHEXPERT_LABELS == tuple(fx.CHEXPERT_HEADER[2:])
    labels = mc.read_chexpert_labels(root)
    assert len(labels) == 3
    study = labels[("17000009", "50000091")]
    assert list(study) == list(mc.CHEXPERT_LABELS)
    assert (study["Edema"], study["Lung Opacity"], study["Atelectasis"]) == (1.0, -1.0, None)
    assert labels[("10000001", "50000012")]["Pleural Effusion"] == 0.0
    (tmp_path / "mimic-cxr-2.0.0-chexpert.csv").write_text(
        ",".join(fx.CHEXPERT_HEADER) + "\n1,2," + ",".join(["2.0"] + [""] * 13) + "\n")
    with pytest.raises(ValueError, match="data row 1: label value '2.0'"):
        mc.read_chexpert_labels(tmp_path)
