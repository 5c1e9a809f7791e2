"""The rule-based CheXpert-style labeler: agreement with the synthetic corpus's ground-truth labels,
hand-written MIMIC-style negation / hedge / aggregation cases, and the official-labeler CSV reader."""
import math

import numpy as np
import pytest

from llmcxr_jax import synthetic
from llmcxr_jax.data.mimic_cxr import CHEXPERT_LABELS, read_chexpert_labels, report_path
from llmcxr_jax.eval import labeler


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(ground-truth labels, full report text) per study of a 150-image synthetic corpus."""
    root = tmp_path_factory.mktemp("synthetic_labels")
    synthetic.synthesize(str(root), num_images=150, image_size=32, seed=3)
    truth = read_chexpert_labels(root)
    texts = {key: report_path(root / "reports" / "files", *key).read_text() for key in truth}
    return truth, texts


def _agreement(truth, texts, part):
    """Per-observation fraction of studies where labeler and ground truth agree (blank == blank),
    and the disagreements as (observation, truth, got)."""
    hits = dict.fromkeys(CHEXPERT_LABELS, 0)
    misses = []
    for key, want in truth.items():
        got = labeler.label_report(labeler.labeling_text(texts[key], part))
        for obs in CHEXPERT_LABELS:
            if got[obs] == want[obs]:
                hits[obs] += 1
            else:
                misses.append((obs, want[obs], got[obs]))
    return {obs: h / len(truth) for obs, h in hits.items()}, misses


def test_agrees_with_synthetic_ground_truth_on_findings_and_impression(corpus):
    truth, texts = corpus
    assert len(truth) >= 60
    per_obs, misses = _agreement(truth, texts, "findings+impression")
    overall = sum(per_obs.values()) / len(per_obs)
    blank = sum(v is None for labels in truth.values() for v in labels.values()) / (14 * len(truth))
    print(f"\nsynthetic agreement over {len(truth)} studies x 14: {overall:.4f} (all-blank labeler: {blank:.4f})")
    for obs, a in per_obs.items():
        print(f"  {obs:28s} {a:.3f}")
    assert overall >= 0.95, misses[:10]
    assert min(per_obs.values()) >= 0.9, per_obs
    # the corpus exercises every kind of label, so agreement is not won on blanks alone
    values = {v for labels in truth.values() for v in labels.values()}
    assert values == {None, 0.0, 1.0, -1.0}


def test_impression_alone_misses_only_the_negations_written_in_findings(corpus):
    # synthetic reports state every positive and uncertain finding in the impression too, but
    # most negations only under FINDINGS: labelling the impression must lose exactly those
    truth, texts = corpus
    per_obs, misses = _agreement(truth, texts, "impression")
    print(f"\nimpression-only agreement: {sum(per_obs.values()) / 14:.4f}, {len(misses)} misses")
    assert misses, "impression-only text should lack some negations"
    assert {(want, got) for _, want, got in misses} == {(0.0, None)}


# (report text, the non-blank labels expected; every other observation must be blank)
HAND_CASES = [
    ("No pleural effusion or pneumothorax.", {"Pleural Effusion": 0, "Pneumothorax": 0, "No Finding": 1}),
    ("There is no focal consolidation, pleural effusion, or pneumothorax.",
     {"Consolidation": 0, "Pleural Effusion": 0, "Pneumothorax": 0, "No Finding": 1}),
    ("Heart size is normal.", {"Cardiomegaly": 0, "No Finding": 1}),
    ("The heart is normal in size. The mediastinum is not widened.",
     {"Cardiomegaly": 0, "Enlarged Cardiomediastinum": 0, "No Finding": 1}),
    ("Normal heart size and mediastinal contours.",
     {"Cardiomegaly": 0, "Enlarged Cardiomediastinum": 0, "No Finding": 1}),
    ("No new consolidation.", {"Consolidation": -1}),  # CheXpert: an old one may persist
    ("Lines and tubes are unchanged in position.", {"Support Devices": 1, "No Finding": 1}),
    ("The endotracheal tube has been removed.", {"Support Devices": 0, "No Finding": 1}),
    ("Small left pleural effusion.", {"Pleural Effusion": 1}),
    ("Small pericardial effusion.", {"No Finding": 1}),
    ("Cannot exclude pneumonia.", {"Pneumonia": -1}),
    ("A small apical pneumothorax cannot be excluded.", {"Pneumothorax": -1}),
    ("No evidence of pneumothorax.", {"Pneumothorax": 0, "No Finding": 1}),
    ("The previously seen pneumothorax is no longer visualized.", {"Pneumothorax": 0, "No Finding": 1}),
    ("Stable mild cardiomegaly.", {"Cardiomegaly": 1}),
    ("Stable cardiomediastinal silhouette.", {"Enlarged Cardiomediastinum": -1}),  # stable says nothing of size
    ("Heart size is borderline.", {"Cardiomegaly": -1}),
    ("The heart is possibly mildly enlarged.", {"Cardiomegaly": -1}),
    ("Resolved pulmonary edema.", {"Edema": 0, "No Finding": 1}),
    ("Pulmonary edema has resolved.", {"Edema": 0, "No Finding": 1}),
    ("Interval improvement in pulmonary edema.", {"Edema": 1}),
    ("Mild pulmonary vascular congestion.", {"Edema": -1}),
    ("Findings consistent with CHF.", {"Edema": 1, "Cardiomegaly": -1}),
    ("Possible small right pleural effusion.", {"Pleural Effusion": -1}),
    ("Left basilar opacity may reflect atelectasis or pneumonia.",
     {"Lung Opacity": 1, "Atelectasis": -1, "Pneumonia": -1}),
    ("Atelectasis versus consolidation at the right base.", {"Atelectasis": -1, "Consolidation": -1}),
    ("Retrocardiac opacity, concerning for pneumonia.", {"Lung Opacity": 1, "Pneumonia": -1}),
    ("Findings suggestive of pneumonia.", {"Pneumonia": -1}),
    ("No focal consolidation to suggest pneumonia.", {"Consolidation": 0, "Pneumonia": 0, "No Finding": 1}),
    ("No pneumothorax, but there is a small left pleural effusion.", {"Pneumothorax": 0, "Pleural Effusion": 1}),
    ("No pneumothorax, small left pleural effusion.", {"Pneumothorax": 0, "Pleural Effusion": 1}),
    ("The lungs are clear without consolidation or edema.", {"Consolidation": 0, "Edema": 0, "No Finding": 1}),
    ("No significant change in small bilateral pleural effusions.", {"Pleural Effusion": 1}),
    ("Extensive plate-like atelectasis at the right lung base.", {"Atelectasis": 1}),
    ("Mild pleural thickening at the apices.", {"Pleural Other": 1}),
    ("Acute displaced fracture of the right sixth rib.", {"Fracture": 1}),
    ("No acute cardiopulmonary process.", {"No Finding": 1}),
    ("Emphysema.", {}),  # a finding outside the 14: No Finding stays blank
    ("1. Small left pleural effusion. 2. No pneumothorax.", {"Pleural Effusion": 1, "Pneumothorax": 0}),
    # aggregation over one report: positive beats negative, uncertain beats negative
    ("Small left effusion. No right effusion.", {"Pleural Effusion": 1}),
    ("Possible right effusion. No left effusion.", {"Pleural Effusion": -1}),
    ("Possible right effusion. Small left effusion.", {"Pleural Effusion": 1}),
]


@pytest.mark.parametrize("text,expected", HAND_CASES, ids=[t[:48] for t, _ in HAND_CASES])
def test_hand_written_mimic_style_sentences(text, expected):
    got = labeler.label_report(text)
    assert list(got) == list(CHEXPERT_LABELS)
    assert {k: v for k, v in got.items() if v is not None} == {k: float(v) for k, v in expected.items()}


def test_label_reports_is_an_array_in_chexpert_order_with_nan_for_blank():
    out = labeler.label_reports(["Small left pleural effusion.", "No pneumothorax.", ""])
    assert out.shape == (3, 14) and out.dtype == np.float64
    col = CHEXPERT_LABELS.index
    assert out[0, col("Pleural Effusion")] == 1.0 and math.isnan(out[0, col("No Finding")])
    assert out[1, col("Pneumothorax")] == 0.0 and out[1, col("No Finding")] == 1.0
    assert np.isnan(np.delete(out[2], col("No Finding"))).all() and out[2, col("No Finding")] == 1.0
    assert labeler.label_reports([]).shape == (0, 14)


def test_mentions_explain_each_label():
    found = labeler.mentions("Small left effusion; no pneumothorax.")
    assert [(m.observation, m.text, m.label) for m in found] == [
        ("Pleural Effusion", "effusion", 1.0), ("Pneumothorax", "pneumothorax", 0.0)]


REPORT = """                                 FINAL REPORT
 INDICATION:  ___ year old man with pneumonia.

 FINDINGS:

 No pleural effusion.

 IMPRESSION:

 Small left pneumothorax.
"""


def test_labeling_text_picks_impression_or_findings_and_impression():
    assert labeler.labeling_text(REPORT, "impression") == "Small left pneumothorax."
    assert labeler.labeling_text(REPORT, "findings+impression") == "No pleural effusion. Small left pneumothorax."
    no_impression = REPORT.split(" IMPRESSION:")[0]
    assert labeler.labeling_text(no_impression, "impression") == "No pleural effusion."
    headerless = " INDICATION:  cough.\n\n Possible pneumonia. No effusion\n continued.\n"
    assert labeler.labeling_text(headerless) == "Possible pneumonia. No effusion continued."
    # the indication's "pneumonia" is not labelled
    assert labeler.label_report(labeler.labeling_text(REPORT))["Pneumonia"] is None
    with pytest.raises(ValueError, match="part must be"):
        labeler.labeling_text(REPORT, "findings")


def test_read_label_csv_reads_chexpert_and_chexbert_outputs(tmp_path):
    # CheXpert labeler output: "Reports" then the labels (older versions say "Airspace Opacity")
    names = ["Airspace Opacity" if n == "Lung Opacity" else n for n in CHEXPERT_LABELS]
    rows = [["Small effusion.", *["" for _ in names]], ["No pneumothorax, possible edema.", *["" for _ in names]]]
    rows[0][1 + CHEXPERT_LABELS.index("Pleural Effusion")] = "1.0"
    rows[1][1 + CHEXPERT_LABELS.index("Pneumothorax")] = "0.0"
    rows[1][1 + CHEXPERT_LABELS.index("Edema")] = "-1.0"
    rows[1][1 + CHEXPERT_LABELS.index("Lung Opacity")] = "1"
    path = tmp_path / "labeled_reports.csv"
    path.write_text("\n".join(",".join(f'"{c}"' for c in r) for r in [["Reports", *names], *rows]) + "\n")
    reports, labels = labeler.read_label_csv(path)
    assert reports == ["Small effusion.", "No pneumothorax, possible edema."]
    want = np.full((2, 14), np.nan)
    want[0, CHEXPERT_LABELS.index("Pleural Effusion")] = 1
    want[1, CHEXPERT_LABELS.index("Pneumothorax")] = 0
    want[1, CHEXPERT_LABELS.index("Edema")] = -1
    want[1, CHEXPERT_LABELS.index("Lung Opacity")] = 1
    np.testing.assert_array_equal(labels, want)

    # CheXbert: "Report Impression" column last, labels in its own order
    order = list(reversed(CHEXPERT_LABELS))
    values = {"Cardiomegaly": "1", "Fracture": "0", "No Finding": ""}
    line = ",".join(values.get(n, "") for n in order)
    path2 = tmp_path / "chexbert.csv"
    path2.write_text(",".join(order) + ",Report Impression\n" + line + ",Heart is big.\n")
    reports, labels = labeler.read_label_csv(path2)
    assert reports == ["Heart is big."]
    assert labels[0, CHEXPERT_LABELS.index("Cardiomegaly")] == 1 and labels[0, CHEXPERT_LABELS.index("Fracture")] == 0
    assert np.isnan(labels).sum() == 12

    path3 = tmp_path / "bad.csv"
    path3.write_text(",".join(order) + ",Reports\n" + line.replace("1", "2", 1) + ",x\n")
    with pytest.raises(ValueError, match="'2' is not 1, 0, -1 or blank"):
        labeler.read_label_csv(path3)
    path4 = tmp_path / "missing.csv"
    path4.write_text("Reports,Edema\nx,1\n")
    with pytest.raises(ValueError, match="lacks columns"):
        labeler.read_label_csv(path4)
