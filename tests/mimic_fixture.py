"""A tiny hand-made MIMIC-CXR-JPG root with one of each edge case the reader must handle;
tests state the counts they expect from these tables by hand.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

# (dicom_id, subject_id, study_id, split, view, StudyDate, StudyTime, file: ok|missing|corrupt)
IMAGES = [
    # subject with 3 studies: s50000012 is the earliest frontal one (same date as s50000011,
    # 09:05:12 written "90512.0" vs 21:30:14 "213014.531"); s50000013 is older but lateral only.
    ("d11a", "10000001", "50000011", "train", "PA", "21800506", "213014.531", "ok"),
    ("d11b", "10000001", "50000011", "train", "LATERAL", "21800506", "213014.531", "ok"),
    ("d12a", "10000001", "50000012", "train", "PA", "21800506", "90512.0", "ok"),
    ("d12b", "10000001", "50000012", "train", "AP", "21800506", "90512.0", "ok"),
    ("d12c", "10000001", "50000012", "train", "LATERAL", "21800506", "90512.0", "ok"),
    ("d13a", "10000001", "50000013", "train", "LATERAL", "21790101", "100000.0", "ok"),
    ("d21a", "10000002", "50000021", "train", "PA", "21810101", "120000", "ok"),       # no FINDINGS
    ("d21b", "10000002", "50000021", "train", "", "21810101", "120000", "ok"),         # unknown view
    ("d31a", "11000003", "50000031", "train", "PA", "21810101", "120000", "ok"),       # no IMPRESSION
    ("d41a", "12000004", "50000041", "train", "PA", "21810101", "120000", "ok"),       # no sections
    ("d51a", "13000005", "50000051", "train", "AP", "21810101", "120000", "ok"),       # no report file
    ("d61a", "14000006", "50000061", "train", "PA", "21810101", "120000", "missing"),  # no image file
    ("d61b", "14000006", "50000061", "train", "LATERAL", "21810101", "120000", "ok"),
    ("d71a", "15000007", "50000071", "train", "PA", "21810101", "120000", "corrupt"),
    ("d91a", "17000009", "50000091", "test", "PA", "21900101", "80000", "ok"),
    ("d91b", "17000009", "50000091", "test", "LATERAL", "21900101", "80000", "ok"),
    ("d92a", "17000009", "50000092", "test", "PA", "21900505", "70000", "ok"),
    ("d101a", "18000010", "50000101", "validate", "AP", "21900101", "80000", "ok"),
    ("d102a", "18000010", "50000102", "validate", "LL", "21800101", "80000", "ok"),     # older, lateral
    ("d111a", "19000011", "50000111", "validate", "PA", "21900101", "80000", "ok"),    # earliest: no IMPRESSION
    ("d112a", "19000011", "50000112", "validate", "PA", "21910101", "80000", "ok"),
    ("d121a", "19900012", "50000121", "test", "PA", "21900101", "80000", "ok"),
    ("d121b", "19900012", "50000121", "test", "AP", "21900101", "80000", "ok"),
]
SPLIT_ONLY = [("d81a", "16000008", "50000081", "train")]            # in split.csv, not metadata
BAD_SPLIT = [("d21z", "10000002", "50000021", "holdout")]           # split value unknown
DUPLICATE = [("d12a", "10000001", "50000012", "train")]             # listed twice in split.csv
METADATA_ONLY = [("d99a", "10000002", "50000021", "PA", "21810101", "120000")]  # not in split.csv

GOLDEN_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ year old woman with cough.

 COMPARISON:  None.

 FINDINGS:
 
 The lungs are clear without focal consolidation.
   No pleural effusion or pneumothorax.  
 
 The cardiomediastinal silhouette is normal.
 
 IMPRESSION:
 
 No acute cardiopulmonary process.
"""
GOLDEN_FINDINGS = ("The lungs are clear without focal consolidation. No pleural effusion or pneumothorax. "
                   "The cardiomediastinal silhouette is normal.")
GOLDEN_IMPRESSION = "No acute cardiopulmonary process."


def _report(findings, impression):
    text = " FINAL REPORT\n EXAMINATION: CHEST\n\n INDICATION: dyspnea\n\n"
    if findings:
        text += f" FINDINGS:\n \n {findings}\n \n"
    if impression:
        text += f" IMPRESSION:\n \n {impression}\n"
    return text


# (subject, study) -> report text; absent = no report file.
REPORTS = {
    ("10000001", "50000011"): _report("Mild cardiomegaly.", "Cardiomegaly."),
    ("10000001", "50000012"): GOLDEN_REPORT,
    ("10000001", "50000013"): _report("Old lateral.", "Old."),
    ("10000002", "50000021"): _report(None, "Small left effusion."),
    ("11000003", "50000031"): _report("Right lower lobe opacity.", None),
    ("12000004", "50000041"): " FINAL REPORT\n WET READ: no sections here\r\n",
    ("14000006", "50000061"): _report("Clear lungs.", "Normal."),
    ("15000007", "50000071"): _report("Clear lungs.", "Normal chest."),
    ("17000009", "50000091"): _report("Edema.", "Pulmonary edema."),
    ("17000009", "50000092"): _report("Better.", "Improved edema."),
    ("18000010", "50000101"): _report("Tube in place.", "Support devices."),
    ("18000010", "50000102"): _report("Lateral only.", "Lateral."),
    ("19000011", "50000111"): _report("Findings only here.", None),
    ("19000011", "50000112"): _report("Later.", "Later impression."),
    ("19900012", "50000121"): _report("Pneumothorax.", "Small right pneumothorax."),
}

CHEXPERT_HEADER = ["subject_id", "study_id", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                   "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity", "No Finding",
                   "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices"]
CHEXPERT_ROWS = [
    ["10000001", "50000011", "", "1.0", "", "", "", "", "", "", "", "", "", "", "", ""],
    ["10000001", "50000012", "", "", "", "", "", "", "", "", "1.0", "0.0", "", "", "0.0", ""],
    ["17000009", "50000091", "", "", "", "1.0", "", "", "", "-1.0", "", "", "", "", "", ""],
]

VQA_FILES = {
    "p10/p10000001/s50000012.txt": repr([
        {"question": "Is there cardiomegaly?", "answer": "No.", "question_type": "presence", "finding": "cm"},
        {"question": "Where is the effusion?", "answer": "None.", "question_type": "location", "finding": "pe"},
        {"question": "How severe?", "question_type": "severity", "finding": "x", "extra": 1},   # no answer
        "not a dict",
    ]),
    "p10/p10000002/s50000021.txt": repr([{"question": "Is there effusion?", "answer": "Yes, small."}]),
    "p11/p11000003/s50000031.txt": "[{'question': 'Is there', ",                                  # syntax
    "p12/p12000004/s50000041.txt": "[{'question': __import__('os').system('touch {PWNED}'), 'answer': 'x'}]",
    "p13/p13000005/s50000051.txt": repr({"question": "q", "answer": "a"}),                       # not a list
    "p10/p10000001/notes.txt": repr([{"question": "q", "answer": "a"}]),                         # bad name
    "p17/p17000009/s50000091.txt": repr([{"question": "Is there edema?", "answer": "Yes.",
                                          "question_type": "presence", "finding": "edema"}]),
}

DOLLY_LINES = [
    json.dumps({"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"}),
    json.dumps({"instruction": "Add 2 and 2.", "response": "4"}),                      # no context: fine
    json.dumps({"instruction": "No answer here.", "context": "", "category": "x"}),    # no response
    json.dumps({"instruction": "", "response": "Empty instruction."}),
    "{not json",
    json.dumps(["a", "list"]),
    "",
]


def _jpeg(seed: int, size: int = 16) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_csv(path: Path, header, rows) -> None:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_corpus(root: Path, reports_root: Path | None = None, pwned: Path | None = None) -> Path:
    """Writes the corpus under root (split CSV gzipped, metadata and chexpert plain); reports go
    under reports_root/files when given (the mimic-cxr-reports zip layout), else root/reports."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    split_rows = [(d, st, su, sp) for d, su, st, sp, *_ in IMAGES]
    split_rows += [(d, st, su, sp) for d, su, st, sp in SPLIT_ONLY + BAD_SPLIT + DUPLICATE]
    _write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split_rows)
    meta_header = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                   "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                   "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]
    meta_rows = [(d, su, st, "CHEST", view, 16, 16, date, time, "CHEST", "", "")
                 for d, su, st, _, view, date, time, _ in IMAGES]
    meta_rows += [(d, su, st, "CHEST", view, 16, 16, date, time, "", "", "")
                  for d, su, st, view, date, time in METADATA_ONLY + [(d, su, st, "PA", "21810101", "1")
                                                                       for d, su, st, _ in BAD_SPLIT]]
    _write_csv(root / "mimic-cxr-2.0.0-metadata.csv", meta_header, meta_rows)
    _write_csv(root / "mimic-cxr-2.0.0-chexpert.csv", CHEXPERT_HEADER, CHEXPERT_ROWS)
    for i, (dicom, subject, study, _, _, _, _, state) in enumerate(IMAGES):
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        folder.mkdir(parents=True, exist_ok=True)
        if state == "ok":
            (folder / f"{dicom}.jpg").write_bytes(_jpeg(i))
        elif state == "corrupt":
            data = _jpeg(i, 64)
            (folder / f"{dicom}.jpg").write_bytes(data[: len(data) // 2])
    reports = (Path(reports_root) if reports_root else root / "reports") / "files"
    for (subject, study), text in REPORTS.items():
        path = reports / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    pwned = pwned or root / "PWNED"
    for rel, text in VQA_FILES.items():
        path = root / "mimic-cxr-jpg_medvqa_v1" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace("{PWNED}", str(pwned)) + "\n")
    (root / "databricks-dolly-15k.jsonl").write_text("\n".join(DOLLY_LINES) + "\n")
    return root
