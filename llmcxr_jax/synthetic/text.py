"""Words of the synthetic CXR corpus: the CheXpert label set, per-study findings, and the
MIMIC-style report, CheXpert label row and VQA pairs that describe them consistently.
Every finding mentioned in a report is drawn in the pixels (positive: fully, uncertain: faintly).
"""
from __future__ import annotations

import dataclasses
import textwrap

import numpy as np

# The 14 CheXpert observations in the column order of mimic-cxr-2.0.0-chexpert.csv.
LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
          "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
          "Pneumothorax", "Support Devices")
# How each label shows in the synthetic corpus (pixels on frontal films / words in the report).
LABEL_NOTES = {
    "Atelectasis": "plate-like band at a lung base (right, left or both); 'basilar'/'bibasilar atelectasis'",
    "Cardiomegaly": "wider cardiac silhouette, also on laterals; mild/moderate/severe",
    "Consolidation": "dense patchy blob in one lobe (or both lower lobes); mild/moderate/extensive",
    "Edema": "bilateral perihilar haze and prominent vessels, also on laterals; mild/moderate/severe",
    "Enlarged Cardiomediastinum": "widened upper mediastinum; mild/moderate/severe",
    "Fracture": "gap and step in one posterior rib (fourth to ninth), right or left",
    "Lung Lesion": "round nodule (small, medium-sized) or mass (large) in an upper/middle/lower lung zone",
    "Lung Opacity": "fainter, grainier patchy opacity in one lobe; mild/moderate/extensive",
    "No Finding": "1.0 when no observation other than Support Devices is positive or uncertain",
    "Pleural Effusion": "basal fluid with a meniscus, blunt costophrenic angle, also on laterals; small/moderate/large",
    "Pleural Other": "never used (always blank)",
    "Pneumonia": "rare: a diagnosis added to some consolidations (positive or hedged), else rarely negated",
    "Pneumothorax": "lucent apicolateral rim without lung markings and a thin pleural edge; small/moderate/large",
    "Support Devices": "endotracheal/enteric tube, jugular catheter, PICC, pacemaker with leads (bright lines, box)",
}
LABEL_VALUE = {"positive": "1.0", "negative": "0.0", "uncertain": "-1.0"}
# Severity words per finding (index = Finding.severity); they are also the VQA severity answers.
SEVERITY = {
    "Cardiomegaly": ("mild", "moderate", "severe"), "Enlarged Cardiomediastinum": ("mild", "moderate", "severe"),
    "Pleural Effusion": ("small", "moderate", "large"), "Pneumothorax": ("small", "moderate", "large"),
    "Consolidation": ("mild", "moderate", "extensive"), "Lung Opacity": ("mild", "moderate", "extensive"),
    "Edema": ("mild", "moderate", "severe"), "Atelectasis": ("mild", "moderate", "extensive"),
    "Lung Lesion": ("small", "medium-sized", "large"),
}
# (P(positive | abnormal study), P(uncertain), P(explicitly negated otherwise)); 22% of studies are normal.
PREVALENCE = {
    "Cardiomegaly": (0.36, 0.04, 0.75), "Pleural Effusion": (0.36, 0.05, 0.85), "Pneumothorax": (0.34, 0.03, 0.8),
    "Consolidation": (0.12, 0.04, 0.5), "Lung Opacity": (0.15, 0.03, 0.1), "Edema": (0.13, 0.05, 0.45),
    "Atelectasis": (0.15, 0.05, 0.05), "Enlarged Cardiomediastinum": (0.1, 0.03, 0.5), "Lung Lesion": (0.08, 0.03, 0.1),
    "Fracture": (0.06, 0.02, 0.2), "Support Devices": (0.25, 0.0, 0.0),
}
NORMAL_STUDY = 0.22
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")


@dataclasses.dataclass(frozen=True)
class Finding:
    """One observation of a study. certainty: positive | uncertain | negative (explicitly negated,
    not drawn). side is the patient's (right = image left); severity indexes SEVERITY[label];
    site is a lobe/zone (upper, middle, lower); where holds drawing numbers fixed per study."""
    label: str
    certainty: str
    side: str = ""
    severity: int = 0
    site: str = ""
    where: tuple = ()
    devices: tuple = ()


def sample_findings(rng: np.random.Generator) -> dict:
    """One study's findings: CheXpert label -> Finding, for every label the report will mention."""
    normal = rng.random() < NORMAL_STUDY
    out = {}
    for label, (p_pos, p_unc, p_neg) in PREVALENCE.items():
        u = rng.random()
        if not normal and u < p_pos:
            certainty = "positive"
        elif not normal and u < p_pos + p_unc:
            certainty = "uncertain"
        elif rng.random() < p_neg:
            certainty = "negative"
        else:
            continue
        out[label] = _attributes(label, certainty, rng)
    cons = out.get("Consolidation")
    if cons is not None and cons.certainty == "positive" and rng.random() < 0.35:
        out["Pneumonia"] = Finding("Pneumonia", "positive" if rng.random() < 0.5 else "uncertain")
    elif cons is None and rng.random() < 0.04:
        out["Pneumonia"] = Finding("Pneumonia", "negative")
    return out


def _attributes(label: str, certainty: str, rng) -> Finding:
    sev = 0 if certainty != "positive" else int(rng.choice(3, p=[0.4, 0.35, 0.25]))
    pick = lambda *xs, p=None: str(rng.choice(xs, p=p))  # noqa: E731
    if certainty == "negative":
        return Finding(label, certainty)
    if label in ("Pleural Effusion", "Atelectasis"):
        return Finding(label, certainty, pick("right", "left", "bilateral", p=[0.35, 0.3, 0.35]), sev,
                       "lower", (float(rng.uniform(0.0, 0.12)), float(rng.uniform(-0.15, 0.15))))
    if label in ("Pneumothorax", "Fracture"):
        where = (int(rng.integers(3, 9)), float(rng.uniform(0.45, 0.7))) if label == "Fracture" else ()
        return Finding(label, certainty, pick("right", "left"), sev if label != "Fracture" else 0, "", where)
    if label in ("Consolidation", "Lung Opacity"):
        side = pick("right", "left", "bilateral", p=[0.45, 0.4, 0.15])
        lobes = {"bilateral": ("lower",), "right": ("upper", "middle", "lower"), "left": ("upper", "lower")}[side]
        site = pick(*lobes)
        return Finding(label, certainty, side, sev, site)
    if label == "Lung Lesion":
        site = pick("upper", "middle", "lower")
        y = {"upper": -0.42, "middle": -0.05, "lower": 0.18}[site] + float(rng.uniform(-0.08, 0.08))
        return Finding(label, certainty, pick("right", "left"), sev, site, (float(rng.uniform(0.35, 0.6)), y))
    if label == "Support Devices":
        kinds = ("ett", "enteric", "cvc", "picc", "pacer")
        n = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
        devices = tuple(sorted(rng.choice(kinds, size=n, replace=False), key=kinds.index))
        return Finding(label, certainty, devices=tuple(str(d) for d in devices))
    return Finding(label, certainty, severity=sev, side="bilateral" if label == "Edema" else "")


def chexpert_row(findings: dict) -> dict:
    """CheXpert label -> "1.0" | "0.0" | "-1.0" | "" ; No Finding is 1.0 when no observation
    other than Support Devices is positive or uncertain (the CheXpert labeler's rule)."""
    row = {label: LABEL_VALUE[f.certainty] for label, f in findings.items()}
    sick = any(f.certainty != "negative" for label, f in findings.items() if label != "Support Devices")
    row["No Finding"] = "" if sick else "1.0"
    return {label: row.get(label, "") for label in LABELS}


# ---- report sentences ------------------------------------------------------------------------

def _place(f: Finding) -> str:
    if f.label == "Lung Lesion":
        return f"{f.side} {f.site} lung"
    if f.side == "bilateral":
        return "bilateral lower lobes"
    return f"{f.side} {f.site} lobe" if f.site != "middle" else "right middle lobe"


POSITIVE = {
    "Cardiomegaly": ["{S} cardiomegaly.", "The heart is {adv} enlarged.", "Heart size is {adv} enlarged.",
                     "There is {s} cardiomegaly.", "{S} enlargement of the cardiac silhouette."],
    "Enlarged Cardiomediastinum": ["The mediastinum is {adv} widened.", "{S} widening of the mediastinum.",
                                   "{S} enlargement of the cardiomediastinal silhouette."],
    "Pleural Effusion": ["{S} {side} pleural effusion.", "There is a {s} {side} pleural effusion.",
                         "{S} {side} pleural effusion with blunting of the costophrenic angle."],
    "Pleural Effusion/bilateral": ["{S} bilateral pleural effusions.", "There are {s} bilateral pleural effusions."],
    "Pneumothorax": ["{S} {side} pneumothorax.", "There is a {s} {side} apical pneumothorax.",
                     "A {s} {side} pneumothorax is present with a visible pleural edge."],
    "Consolidation": ["{S} consolidation in the {place}.", "There is {s} {place} consolidation.",
                      "Focal {s} consolidation in the {place}."],
    "Lung Opacity": ["{S} patchy opacity in the {place}.", "There is a {s} opacity in the {place}.",
                     "Hazy {s} opacities in the {place}."],
    "Edema": ["{S} pulmonary edema.", "There is {s} interstitial pulmonary edema.", "{S} perihilar pulmonary edema."],
    "Atelectasis": ["{S} {side} basilar atelectasis.", "{S} plate-like atelectasis at the {side} lung base."],
    "Atelectasis/bilateral": ["{S} bibasilar atelectasis.", "{S} bilateral basilar atelectasis."],
    "Lung Lesion": ["A {s} {noun} in the {place}.", "There is a {s} {noun} in the {place}.",
                    "{S} {noun} projecting over the {place}."],
    "Fracture": ["Acute fracture of the {side} {ord} posterior rib.", "There is a displaced {side} {ord} rib fracture.",
                 "{Side} {ord} posterior rib fracture."],
    "Pneumonia": ["Findings are consistent with pneumonia.", "The appearance is compatible with pneumonia."],
}
UNCERTAIN = {
    "Cardiomegaly": ["Heart size is borderline.", "Borderline cardiomegaly.", "The heart is possibly mildly enlarged."],
    "Enlarged Cardiomediastinum": ["The mediastinum may be slightly widened.", "Possible mild mediastinal widening."],
    "Pleural Effusion": ["Possible small {side} pleural effusion.",
                         "A small {side} pleural effusion cannot be excluded.",
                         "Blunting of the {side} costophrenic angle may reflect a small pleural effusion."],
    "Pneumothorax": ["A small {side} apical pneumothorax cannot be excluded.", "Possible small {side} pneumothorax."],
    "Consolidation": ["Possible early consolidation in the {place}.",
                      "Subtle consolidation in the {place} cannot be excluded."],
    "Lung Opacity": ["Possible subtle opacity in the {place}.", "A faint opacity in the {place} may be present."],
    "Edema": ["Possible mild pulmonary edema.", "Mild pulmonary vascular congestion may reflect early edema."],
    "Atelectasis": ["Possible {side} basilar atelectasis.", "Minimal {side} basilar atelectasis cannot be excluded."],
    "Lung Lesion": ["Possible nodule in the {place}.", "A small nodule in the {place} cannot be excluded."],
    "Fracture": ["Possible nondisplaced fracture of the {side} {ord} rib."],
    "Pneumonia": ["This may represent pneumonia in the appropriate clinical setting.",
                  "Findings could reflect pneumonia."],
}
NEGATIVE = {
    "Cardiomegaly": ["Heart size is normal.", "The heart is normal in size.", "Normal heart size.", "No cardiomegaly."],
    "Enlarged Cardiomediastinum": ["Mediastinal contours are normal.", "The mediastinum is not widened.",
                                   "Normal cardiomediastinal silhouette."],
    "Heart and mediastinum": ["Heart size and mediastinal contours are normal.",
                              "The heart and mediastinum are within normal limits."],
    "Lung Opacity": ["No focal opacity."], "Atelectasis": ["No atelectasis."],
    "Lung Lesion": ["No pulmonary nodules or masses.", "No suspicious pulmonary nodule."],
    "Fracture": ["No displaced rib fracture.", "No acute fracture is seen."],
    "Pneumonia": ["No evidence of pneumonia."],
}
# Negations that read naturally as one list: "No focal consolidation, pleural effusion, or pneumothorax."
LISTED_NEGATIVES = {"Consolidation": "focal consolidation", "Edema": "pulmonary edema",
                    "Pleural Effusion": "pleural effusion", "Pneumothorax": "pneumothorax"}
DEVICE_SENTENCES = {
    "ett": ["Endotracheal tube terminates {n} cm above the carina.",
            "The endotracheal tube tip is {n} cm above the carina."],
    "enteric": ["Enteric tube courses below the diaphragm with its tip in the stomach.",
                "Nasogastric tube tip is in the stomach."],
    "cvc": ["Right internal jugular central venous catheter terminates in the mid SVC.",
            "Right IJ catheter tip is in the SVC."],
    "picc": ["Right PICC terminates in the lower SVC.", "Right upper extremity PICC tip projects over the SVC."],
    "pacer": ["Left-sided pacemaker with leads in the right atrium and right ventricle.",
              "Dual-lead pacemaker in the left chest."],
}
NORMAL_LUNGS = ["The lungs are clear.", "Lungs are well expanded and clear.", "The lungs are well aerated and clear."]
NORMAL_BONES = ["The osseous structures are intact.", "No acute osseous abnormality."]
NORMAL_IMPRESSION = ["No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
                     "No acute intrathoracic process.", "No evidence of acute disease."]
TECHNIQUE = {"CHEST (PA AND LAT)": "Chest PA and lateral", "CHEST (AP AND LAT)": "Chest AP and lateral",
             "CHEST (PORTABLE AP)": "Portable AP chest radiograph", "CHEST (PA)": "Single PA view of the chest"}
INDICATIONS = ["shortness of breath", "chest pain", "cough and fever", "hypoxia", "dyspnea on exertion", "a fall",
               "pre-operative evaluation", "tachycardia", "altered mental status", "weakness", "follow-up"]
PARENCHYMA = ("Consolidation", "Lung Opacity", "Edema", "Atelectasis", "Lung Lesion")
ORDER = ("Support Devices", "Pneumothorax", "Pleural Effusion", "Consolidation", "Lung Opacity", "Pneumonia", "Edema",
         "Atelectasis", "Lung Lesion", "Cardiomegaly", "Enlarged Cardiomediastinum", "Fracture")


def sentence(f: Finding, rng: np.random.Generator) -> str:
    """One report sentence stating a positive or uncertain finding (or negating one)."""
    if f.certainty == "negative":
        return str(rng.choice(NEGATIVE[f.label]))
    if f.label == "Support Devices":
        return " ".join(str(rng.choice(DEVICE_SENTENCES[d])).format(n=int(rng.integers(3, 7))) for d in f.devices)
    table = POSITIVE if f.certainty == "positive" else UNCERTAIN
    key = f"{f.label}/bilateral" if f.side == "bilateral" and f"{f.label}/bilateral" in table else f.label
    s = SEVERITY.get(f.label, ("",) * 3)[f.severity]
    words = {"s": s, "S": s.capitalize(), "adv": s + "ly", "side": f.side,
             "Side": f.side.capitalize(), "place": _place(f) if f.site else "",
             "noun": "mass" if f.severity == 2 else "nodule",
             "ord": ORDINALS[f.where[0]] if f.label == "Fracture" else ""}
    return str(rng.choice(table[key])).format(**words)


def _negations(findings: dict, rng) -> list[str]:
    neg = {label for label, f in findings.items() if f.certainty == "negative"}
    out = []
    listed = [LISTED_NEGATIVES[label] for label in LISTED_NEGATIVES if label in neg]
    if listed:
        body = listed[0] if len(listed) == 1 else (" or ".join(listed) if len(listed) == 2 else
                                                    ", ".join(listed[:-1]) + ", or " + listed[-1])
        out.append(f"No {body}." if rng.random() < 0.7 else f"There is no {body}.")
    if {"Cardiomegaly", "Enlarged Cardiomediastinum"} <= neg and rng.random() < 0.6:
        out.append(str(rng.choice(NEGATIVE["Heart and mediastinum"])))
        neg -= {"Cardiomegaly", "Enlarged Cardiomediastinum"}
    out += [sentence(findings[label], rng) for label in ORDER if label in neg and label in NEGATIVE]
    return out


def report_text(findings: dict, exam: str, first_study: bool, rng: np.random.Generator) -> tuple[str, str]:
    """MIMIC-style free-text report -> (text, layout) with layout "full" (FINDINGS and IMPRESSION),
    "impression" (about 10%: no FINDINGS) or "none" (about 2%: neither section header)."""
    shown = [findings[label] for label in ORDER if label in findings and findings[label].certainty != "negative"]
    body = [sentence(f, rng) for f in shown]
    if not any(f.label in PARENCHYMA or f.label == "Pleural Effusion" for f in shown):
        body.insert(len([f for f in shown if f.label == "Support Devices"]), str(rng.choice(NORMAL_LUNGS)))
    negations = _negations(findings, rng)
    findings_part = body + negations
    if "Fracture" not in findings and rng.random() < 0.5:
        findings_part.append(str(rng.choice(NORMAL_BONES)))
    impression = [sentence(f, rng) for f in shown] or [str(rng.choice(NORMAL_IMPRESSION))]
    u = rng.random()
    layout = "none" if u < 0.02 else "impression" if u < 0.12 else "full"
    indication = f"___ year old {rng.choice(['man', 'woman'])} with {rng.choice(INDICATIONS)}."
    lines = [" " * 33 + "FINAL REPORT", f" EXAMINATION:  {exam}", "", f" INDICATION:  {indication}", ""]
    if rng.random() < 0.6:
        lines += [f" TECHNIQUE:  {TECHNIQUE.get(exam, 'Chest radiograph')}.", ""]
    lines += [f" COMPARISON:  {'None.' if first_study else 'Chest radiograph from ___.'}", ""]
    wrap = lambda ss: textwrap.fill("  ".join(ss), 78, initial_indent=" ", subsequent_indent=" ")  # noqa: E731
    if layout == "full":
        lines += [" FINDINGS:", " ", wrap(findings_part), " ", " IMPRESSION:", " ", wrap(impression)]
    elif layout == "impression":
        lines += [" IMPRESSION:", " ", wrap(impression + negations)]
    else:
        lines += [wrap(findings_part + impression)]
    return "\n".join(lines) + "\n", layout


# ---- VQA ----------------------------------------------------------------------------------------

NOUNS = {  # label -> (noun phrase with article for presence questions, bare noun)
    "Atelectasis": ("atelectasis", "atelectasis"), "Cardiomegaly": ("cardiomegaly", "cardiomegaly"),
    "Consolidation": ("consolidation", "consolidation"), "Edema": ("pulmonary edema", "pulmonary edema"),
    "Enlarged Cardiomediastinum": ("mediastinal widening", "mediastinal widening"),
    "Fracture": ("a rib fracture", "rib fracture"), "Lung Lesion": ("a lung nodule or mass", "lung lesion"),
    "Lung Opacity": ("a lung opacity", "lung opacity"), "Pleural Effusion": ("a pleural effusion", "pleural effusion"),
    "Pneumothorax": ("a pneumothorax", "pneumothorax"), "Support Devices": ("any support device", "support device"),
}
PRESENCE_Q = ["Is there {n}?", "Is there evidence of {n}?", "Does this chest X-ray show {n}?",
              "Can {n} be seen on this radiograph?", "Is {n} present?"]
LOCATION_Q = ["Where is the {b}?", "Which side is the {b} on?", "What is the location of the {b}?",
              "On which side is the {b} located?"]
SEVERITY_Q = ["How severe is the {b}?", "What is the severity of the {b}?", "How would you grade the {b}?"]
SIZE_Q = ["How large is the {b}?", "What is the size of the {b}?"]


def vqa_pairs(findings: dict, rng: np.random.Generator) -> list[dict]:
    """Question/answer dicts (question, answer, question_type, finding) consistent with the labels:
    presence for positive and absent findings, location and severity for positive ones.
    Uncertain findings are not asked about."""
    pos = [label for label in NOUNS if label in findings and findings[label].certainty == "positive"]
    absent = [label for label in NOUNS if label not in findings or findings[label].certainty == "negative"]
    asked_absent = [str(x) for x in rng.choice(absent, size=min(len(absent), int(rng.integers(2, 4))), replace=False)]
    out = []
    for label in pos + asked_absent:
        q = str(rng.choice(PRESENCE_Q)).format(n=NOUNS[label][0])
        out.append({"question": q[0].upper() + q[1:], "answer": "Yes." if label in pos else "No.",
                    "question_type": "presence", "finding": label})
    for label in pos:
        f, bare = findings[label], NOUNS[label][1]
        if f.side and label != "Edema" and rng.random() < 0.8:
            where = _place(f) if label in ("Consolidation", "Lung Opacity", "Lung Lesion") else f.side
            out.append({"question": str(rng.choice(LOCATION_Q)).format(b=bare), "answer": where.capitalize() + ".",
                        "question_type": "location", "finding": label})
        if label in SEVERITY and rng.random() < 0.8:
            qs = SIZE_Q if label in ("Pleural Effusion", "Pneumothorax", "Lung Lesion") else SEVERITY_Q
            answer = SEVERITY[label][f.severity].capitalize() + "."
            out.append({"question": str(rng.choice(qs)).format(b=bare), "answer": answer,
                        "question_type": "severity", "finding": label})
    order = rng.permutation(len(out))
    return [out[i] for i in order]
