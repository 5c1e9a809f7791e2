"""A rule-based approximation of the CheXpert labeler (Irvin et al. 2019, stanfordmlgroup/chexpert-labeler):
report text -> the 14 CheXpert observations as 1 (positive), 0 (negative), -1 (uncertain) or blank.
Regular expressions stand in for the original's dependency-parse rules; for published numbers, label
with the official labeler or CheXbert and read its CSV with `read_label_csv`.

How a report is labelled
  1. Text: lowercased, whitespace collapsed, split into sentences at ". ", "? ", "! " ("vs." and a
     few abbreviations are protected), each sentence into clauses at ";", ":", "but", "however",
     "although", "though", "whereas", "while", "except", "which", "and there/the/it/this/...".
  2. Mentions: per observation, the CheXpert mention phrases (MENTIONS; e.g. "the heart", "heart
     size", "cardiac silhouette" for Cardiomegaly, "contour", "mediastinum" for Enlarged
     Cardiomediastinum), minus the "unmention" phrases ("pericardial effusion", "calcified nodule",
     "massive", "pleural scar" for opacity, "plate-like" for devices). Phrases of other findings
     (emphysema, granuloma, scoliosis, ...; OTHER_FINDINGS) are found too: they only block No Finding.
  3. Each mention is classified in CheXpert's order, looking only inside its clause:
     a. uncertain, checked before negation: "cannot exclude", "cannot be excluded", "not excluded",
        "can't be ruled out", "difficult to exclude", "no new X" (CheXpert: an old X may persist),
        "not well seen/visualized/evaluated", "poorly evaluated", "not appreciated";
     b. negative: "no", "not", "without", "negative for", "free of", "clear of", "absence of",
        "rather than", "resolved", "resolution of", "removal of", "history of", "rule out",
        "exclude" before the mention; its scope runs to the clause end but stops at a comma
        unless an "or"/"nor" follows (so "No focal consolidation, pleural effusion, or
        pneumothorax." negates all three, "No pneumothorax, small effusion." only the first);
        "normal"/"unremarkable" directly before (up to five words, no comma: "normal heart size
        and mediastinal contours"); after the mention, before the next comma and within eight
        words: "not", "no longer", "resolved", "cleared", "removed", "absent", "is/are/appears
        (top) normal/unremarkable", "normal in size", "within normal limits", "upper limits of
        normal". "No (significant) change in" and "not changed" are stability, not negation;
     c. uncertain: hedges before the mention ("possible", "probable", "questionable",
        "suspected", "suspicious (for)", "concerning for", "suggest...", "question of",
        "differential", "equivocal", "may/could/might/possibly represent|reflect|indicate|be due
        to ..."), anywhere in the clause ("may", "might", "could", "would", "possibly",
        "probably", "perhaps", "borderline", "less likely") or after it ("is possible/suspected/
        questionable/questioned"); "X or Y", "X versus Y" (at most four words apart, nothing
        between them but those words);
        a silhouette-type mention (heart, heart size, silhouette, contour, mediastinum, ...) said
        to be stable/unchanged/similar to prior with no word of enlargement (CheXpert's rule:
        "stable heart size" says nothing about its size); vascular or pulmonary congestion,
        indistinctness and vascular prominence always (CheXpert labels them Edema -1);
     d. otherwise positive. "likely" is not a hedge (as in CheXpert, whose rules know only "less
        likely"); "consistent with" and "compatible with" are positive unless a modal precedes.
  4. Per observation over the report: positive if any mention is positive, else uncertain if any
     is uncertain, else negative if any is negative, else blank. (CheXpert's aggregator returns -1
     when a report holds 1, 0 and -1 mentions of one observation; we return 1.) A positive or
     uncertain "heart failure"/"chf" mention adds an uncertain Cardiomegaly mention (CheXpert's
     exception).
  5. No Finding = 1 when no mention of any observation other than Support Devices (other
     findings included) is positive or uncertain, else blank; it is never 0.
Which text to label: MIMIC-CXR's CheXpert labels come from the impression (else findings, else the
last paragraph); `labeling_text` picks that or findings + impression.
"""
from __future__ import annotations

import csv
import dataclasses
import re
from collections.abc import Iterable

import numpy as np

from llmcxr_jax import user_files
from llmcxr_jax.data.mimic_cxr import CHEXPERT_LABELS, parse_report
from llmcxr_jax.errors import UsageError

__all__ = ["CHEXPERT_LABELS", "MENTIONS", "OTHER_FINDINGS", "Mention", "label_report", "label_reports",
           "labeling_text", "mentions", "read_label_csv"]

NO_FINDING = "No Finding"
SUPPORT_DEVICES = "Support Devices"
OTHER = "other finding"  # blocks No Finding, never a column
POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0

# Mention regexes per observation (matched on lowercased text). The CheXpert phrase lists, with a
# few synonyms ("mediastinal widening", "enlargement of the heart", "pneumothoraces").
MENTIONS: dict[str, tuple[str, ...]] = {
    "Atelectasis": (r"\batelecta\w*", r"\bcollaps(?:e|ed|es)\b"),
    "Cardiomegaly": (r"\bcardiomegaly\b", r"\bthe heart\b", r"\bheart (?=is|appears|remains|was|size)\b",
                     r"\bheart size\b", r"\bcardiac (?:enlargement|size|shadow|contours?|silhouette)\b",
                     r"\benlarged heart\b", r"\benlargement of the heart\b"),
    "Consolidation": (r"\bconsolidat\w*",),
    "Edema": (r"\b(?:o)?edema\w*", r"\bheart failure\b", r"\bchf\b", r"\bvascular congestion\b",
              r"\bpulmonary congestion\b", r"\bindistinctness\b", r"\bvascular prominence\b"),
    "Enlarged Cardiomediastinum": (r"\bmediastinum\b", r"\bcardiomediastin(?:um|al)\b", r"\bcontours?\b",
                                   r"\bmediastinal (?:widening|enlargement|silhouette|configuration|width)\b",
                                   r"\bpericardial silhouette\b"),
    "Fracture": (r"\bfractur\w*",),
    "Lung Lesion": (r"\bmass(?:es)?\b", r"\bnodules?\b", r"\bnodular (?:densit(?:y|ies)|opaci\w*)",
                    r"\blumps?\b", r"\blesions?\b", r"\bcarcinomas?\b", r"\bneoplasms?\b", r"\btumou?rs?\b"),
    "Lung Opacity": (r"\bopaci\w*", r"\bdecreased translucency\b", r"\bincreased densit(?:y|ies)\b",
                     r"\bair[- ]?space disease\b", r"\binfiltrat\w*", r"\binterstitial (?:markings?|pattern|lung)\b",
                     r"\breticular (?:pattern|markings?)\b", r"\breticulation\b", r"\bparenchymal scarring\b",
                     r"\bperibronchial thickening\b", r"\bwall thickening\b", r"\bscar\w*"),
    "Pleural Effusion": (r"\beffusions?\b", r"\bpleural fluid\b"),
    "Pleural Other": (r"\bpleural thickening\b", r"\bfibrosis\b", r"\bfibrothorax\b",
                      r"\bpleural (?:parenchymal )?scar\w*", r"\bpleuro-?(?:parenchymal|pericardial) scar\w*"),
    "Pneumonia": (r"\b(?:broncho)?pneumonias?\b", r"\binfections?\b", r"\binfectious\b"),
    "Pneumothorax": (r"pneumothora(?:x|ces)\b",),
    "Support Devices": (r"\bpacers?\b", r"\bpacemakers?\b", r"\blines?\b", r"\bpicc\b", r"\btubes?\b",
                        r"\bvalves?\b", r"\bcatheters?\b", r"\bhardware\b", r"\barthroplast\w*", r"\bicd\b",
                        r"\bdefib\w*", r"\bdevices?\b", r"\bdrains?\b", r"\bplates?\b", r"\bscrews?\b",
                        r"\bcannulas?\b", r"\bapparatus\b", r"\bcoils?\b", r"\bequipment\b", r"\bmediport\b",
                        r"\bport(?:-a-cath)?\b", r"\bwires?\b", r"\bleads?\b", r"\bstents?\b", r"\bett\b"),
}
# Phrases that look like a mention but are not one (a mention overlapping them is dropped).
UNMENTIONS: dict[str, tuple[str, ...]] = {
    "Pleural Effusion": (r"\bpericardial effusions?\b",),
    "Lung Lesion": (r"\bcalcified nodul\w*", r"\b(?:osseous|lytic|sclerotic|bony|bone|skin) lesions?\b"),
    "Lung Opacity": (r"\bpleural (?:parenchymal )?scar\w*", r"\bpleuro-?(?:parenchymal|pericardial) scar\w*"),
    "Cardiomegaly": (r"\bthe heart borders?\b",),
    "Enlarged Cardiomediastinum": (r"\bcontours? of the (?:hemi)?diaphragms?\b",),
    "Support Devices": (r"\bplate-?\s?like\b", r"\b(?:pleural|skin|fissure|septal|kerley b?) lines?\b",
                        r"\bleads? to\b", r"\bline of\b"),
}
# Findings outside the 14 whose positive or uncertain mention keeps No Finding blank (from the
# CheXpert labeler's no_finding phrase list, less its device words "defib" and "tracheostomy").
OTHER_FINDINGS = (
    r"\bemphysema\w*", r"\bblunt\w*", r"\bdensit(?:y|ies)\b", r"\belevat\w*", r"\beventration\b", r"\bscoliosis\b",
    r"\bdegenera\w*", r"\bcalcifi\w*", r"\bhyperinflat\w*", r"\bhyperexpan\w*", r"\bbronchospasm\b", r"\basthma\b",
    r"\bhernias?\b", r"\bcopd\b", r"\bplaques?\b", r"\bosteophyt\w*", r"\baortic disease\b", r"\bbronchiolitis\b",
    r"\bairways? disease\b", r"\bthickening\b", r"\bcephalization\b", r"\baspiration\b", r"\bbullae\b",
    r"\bcontusions?\b", r"\batherosclero\w*", r"\bosteopenia\b", r"\bmetasta\w*", r"\bgranulomas?\b",
    r"\bpneumomediastinum\b", r"\bpneumoperitoneum\b", r"\bosteodystrophy\b", r"\bcuffing\b",
    r"\birregular lucency\b", r"\binflam\w*", r"\bfissures?\b", r"\bhypertension\b", r"\bprominen\w*",
    r"\bkyphosis\b", r"\bbullets?\b", r"\breticula\w*", r"\bthoracentesis\b", r"\bbronchitis\b", r"\bvolume loss\b",
    r"\bdeformit(?:y|ies)\b", r"\bhemorrhage\b", r"\bhematomas?\b", r"\bradiopaque\b", r"\baerophagia\b",
    r"\barthropathy\b",
)
ALWAYS_UNCERTAIN = re.compile(r"\b(?:vascular congestion|pulmonary congestion|indistinctness|vascular prominence)\b")
HEART_FAILURE = re.compile(r"\b(?:heart failure|chf)\b")
SILHOUETTE = re.compile(r"heart|size|silhouette|contour|configuration|shadow|mediastin")

_ABBREVIATIONS = re.compile(r"\b(vs|dr|approx|e\.g|i\.e|etc|st)\.(?=\s+[a-z0-9])")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_CLAUSE_BREAK = re.compile(
    r";|:|\b(?:but|however|although|though|whereas|while|except|apart from|aside from|which)\b"
    r"|\band (?=(?:there|the|it|this|these|that|is|are)\b)")

_PRE_NEG_UNCERTAIN = re.compile(
    r"\b(?:cannot|can ?not|can't|could not|couldn't|not|difficult to|hard to|unable to)\s+(?:be\s+)?"
    r"(?:entirely\s+|completely\s+|definitely\s+|totally\s+|fully\s+)?(?:exclude[sd]?|rule[sd]? out|ruled out)\b"
    r"|\bnot (?:well |clearly |definitely )?(?:seen|visualized|evaluated|assessed)\s+(?:well|clearly)\b"
    r"|\bnot (?:well|clearly|adequately) (?:seen|visualized|evaluated|assessed)\b"
    r"|\b(?:poorly|incompletely) (?:seen|visualized|evaluated|assessed)\b|\bnot appreciated\b")
_NO_NEW = re.compile(r"\bno (?:\w+ )?new\b")
_NEG_BEFORE = re.compile(
    r"\b(?:no|not|without|nor|neither|negative for|free of|clear(?:ed|ing)? of|absen(?:ce|t) of|rather than"
    r"|resolved|resolution of|removal of|history of|disappearance of|rule[sd]? out|exclude[sd]?)\b")
_NORMAL_BEFORE = re.compile(r"\b(?:normal|unremarkable)\b")
_STABILITY = re.compile(
    r"\bno (?:significant |substantial |appreciable |interval |definite )*(?:change|changes)\b(?: in| of| from)?"
    r"|\b(?:has |have |is |are )?not (?:significantly |substantially )?changed\b"
    r"|\bstable\b|\bunchanged\b|\bsimilar (?:to|compared to|in comparison to) (?:the )?prior\b")
_NEG_AFTER = re.compile(
    r"\bnot\b|\bno longer\b|\bresolved\b|\bcleared\b|\bremoved\b|\babsent\b|\bwithin normal limits\b"
    r"|\bupper limits? of normal\b|\bnormal in (?:size|caliber|contour|configuration|appearance)\b"
    r"|\b(?:is|are|was|were|appears?|remains?|looks?|seems?)\s+(?:now\s+|otherwise\s+|again\s+|also\s+|still\s+"
    r"|essentially\s+|grossly\s+|overall\s+|top\s+|top-|low\s+|low-)?(?:normal|unremarkable)\b")
_HEDGE_BEFORE = re.compile(
    r"\b(?:possible|probable|presumed|presumably|questionable|question of|suggestion of|suspect(?:s|ed)?"
    r"|suspicious(?: for)?|suspicion (?:of|for)|concern(?:ing)? for|worrisome(?: for)?|suggest(?:s|ed|ing|ive)?"
    r"|favou?r(?:s|ed|ing)?|consider(?:ed)?|differential|equivocal|maybe|secondary to|correlat(?:e|ion))\b"
    r"|\b(?:may|might|could|would|can|possibly|probably)\s+(?:also\s+|well\s+)?(?:represent|reflect|indicate|include"
    r"|suggest|be due to|be related to|relate to|be secondary to|be compatible with|be consistent with"
    r"|correspond to|be from)\b")
_HEDGE_ANYWHERE = re.compile(r"\b(?:may|might|could|would|possibly|probably|perhaps|borderline|less likely)\b")
_HEDGE_AFTER = re.compile(
    r"\b(?:is|are|was|were|be|remains?|appears?)\s+(?:also\s+|still\s+)?(?:possible|probable|questionable|suspected"
    r"|questioned|borderline|equivocal|a consideration|considered|favou?red|suggested)\b|\bsuspected\b|\bquestioned\b")
_ENLARGED = re.compile(r"enlarg|cardiomegaly|widen")
_OR = re.compile(r"\b(?:or|and/or|versus|vs)\b")


@dataclasses.dataclass(frozen=True)
class Mention:
    observation: str   # one of CHEXPERT_LABELS, or OTHER
    text: str          # the matched phrase
    sentence: str      # the clause it was judged in
    label: float       # POSITIVE, NEGATIVE or UNCERTAIN


def _compile(table: dict[str, tuple[str, ...]]) -> dict[str, re.Pattern]:
    return {k: re.compile("|".join(f"(?:{p})" for p in v)) for k, v in table.items()}


_MENTION_RES = {**_compile(MENTIONS), OTHER: re.compile("|".join(f"(?:{p})" for p in OTHER_FINDINGS))}
_UNMENTION_RES = _compile(UNMENTIONS)


def _sentences(text: str) -> list[str]:
    text = re.sub(r"\s+", " ", text.lower()).strip()
    text = _ABBREVIATIONS.sub(lambda m: m.group(1).replace(".", ""), text)
    return [s.strip(" .!?") for s in _SENTENCE_END.split(text) if s.strip(" .!?")]


def _clauses(sentence: str) -> list[str]:
    return [c.strip(" ,") for c in _CLAUSE_BREAK.split(sentence) if c.strip(" ,")]


def _find(clause: str) -> list[tuple[str, int, int]]:
    """(observation, start, end) of every mention in the clause; overlapping matches of one
    observation merged, matches overlapping an unmention phrase dropped."""
    found = []
    for obs, pattern in _MENTION_RES.items():
        blocked = [m.span() for m in _UNMENTION_RES[obs].finditer(clause)] if obs in _UNMENTION_RES else []
        spans = []
        for m in pattern.finditer(clause):
            s, e = m.span()
            if any(s < be and bs < e for bs, be in blocked):
                continue
            if spans and s < spans[-1][1]:
                spans[-1] = (spans[-1][0], max(e, spans[-1][1]))
            else:
                spans.append((s, e))
        found += [(obs, s, e) for s, e in spans]
    return sorted(found, key=lambda t: (t[1], t[2]))


def _scope_end(clause: str, start: int) -> int:
    """Where a negation starting at `start` stops: the clause end, or the first comma that no
    later "or"/"nor" continues as a list."""
    for m in re.finditer(",", clause[start:]):
        p = start + m.start()
        if not re.search(r"\b(?:or|nor)\b", clause[p:]):
            return p
    return len(clause)


def _after_window(clause: str, end: int, words: int = 8) -> str:
    tail = clause[end:].split(",")[0]
    return " ".join(tail.split()[:words])


def _negated(clause: str, s: int, e: int) -> bool:
    before = clause[:s]
    for m in _NEG_BEFORE.finditer(_STABILITY.sub(lambda x: "#" * len(x.group()), before)):
        if _scope_end(clause, m.end()) >= s:
            return True
    for m in _NORMAL_BEFORE.finditer(before):
        between = clause[m.end():s]
        if "," not in between and len(between.split()) <= 5 and not re.search(r"\bwith(?:out)?\b", between):
            return True
    after = _STABILITY.sub(" ", _after_window(clause, e))
    return bool(_NEG_AFTER.search(after))


def _hedged(clause: str, s: int, e: int, spans: list[tuple[str, int, int]]) -> bool:
    interpretive = list(_HEDGE_BEFORE.finditer(clause))
    if any(m.end() <= s for m in interpretive):
        return True
    masked = clause
    for m in interpretive:  # a modal that interprets ("may represent") only hedges what follows it
        masked = masked[:m.start()] + "#" * (m.end() - m.start()) + masked[m.end():]
    if _HEDGE_ANYWHERE.search(masked):
        return True
    if _HEDGE_AFTER.search(clause[e:]):
        return True
    left = [e2 for _, s2, e2 in spans if e2 <= s]
    right = [s2 for _, s2, e2 in spans if s2 >= e]
    between = ([clause[max(left):s]] if left else []) + ([clause[e:min(right)]] if right else [])
    if any(_OR.search(b) and len(b.split()) <= 4 for b in between):
        return True  # "X or/versus Y", the nearest mentions on either side: both uncertain
    text = clause[s:e]
    if SILHOUETTE.search(text) and _STABILITY.search(clause) and not _ENLARGED.search(clause):
        return True
    return bool(ALWAYS_UNCERTAIN.fullmatch(text))


def _classify(clause: str, s: int, e: int, spans) -> float:
    if _PRE_NEG_UNCERTAIN.search(clause):
        return UNCERTAIN
    for m in _NO_NEW.finditer(clause[:s]):
        if _scope_end(clause, m.end()) >= s:
            return UNCERTAIN
    if _negated(clause, s, e):
        return NEGATIVE
    if _hedged(clause, s, e, spans):
        return UNCERTAIN
    return POSITIVE


def mentions(text: str) -> list[Mention]:
    """Every mention in `text` with its label (for inspecting why a report got its labels)."""
    out = []
    for sentence in _sentences(text):
        for clause in _clauses(sentence):
            spans = _find(clause)
            for obs, s, e in spans:
                others = [t for t in spans if t[1:] != (s, e)]
                out.append(Mention(obs, clause[s:e], clause, _classify(clause, s, e, others)))
    return out


def label_report(text: str) -> dict[str, float | None]:
    """Report text -> {observation: 1.0 | 0.0 | -1.0 | None (not mentioned)} for CHEXPERT_LABELS."""
    found: dict[str, list[float]] = {}
    for m in mentions(text):
        found.setdefault(m.observation, []).append(m.label)
        if m.label != NEGATIVE and HEART_FAILURE.fullmatch(m.text):
            found.setdefault("Cardiomegaly", []).append(UNCERTAIN)
    out: dict[str, float | None] = {}
    for obs in CHEXPERT_LABELS:
        values = found.get(obs, [])
        out[obs] = (POSITIVE if POSITIVE in values else UNCERTAIN if UNCERTAIN in values
                    else NEGATIVE if values else None)
    sick = any(v != NEGATIVE for obs, vs in found.items() if obs != SUPPORT_DEVICES for v in vs)
    out[NO_FINDING] = None if sick else POSITIVE
    return out


def label_reports(texts: Iterable[str]) -> np.ndarray:
    """Reports -> float array [n, 14] in CHEXPERT_LABELS order: 1, 0, -1, nan for blank."""
    rows = [[np.nan if v is None else v for v in label_report(t).values()] for t in texts]
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(CHEXPERT_LABELS))


def labeling_text(report: str, part: str = "impression") -> str:
    """The part of a full MIMIC-CXR report text to label. "impression": the impression, else the
    findings, else the last paragraph (how MIMIC-CXR's CheXpert labels were made); "findings+impression":
    both joined (either alone when the other is missing), else the last paragraph."""
    if part not in ("impression", "findings+impression"):
        raise UsageError(f"part must be 'impression' or 'findings+impression', got {part!r}")
    findings, impression = parse_report(report)
    text = impression or findings if part == "impression" else " ".join(p for p in (findings, impression) if p)
    if text:
        return text
    paragraphs = [p for p in re.split(r"\n\s*\n", report.replace("\r\n", "\n")) if p.strip()]
    return " ".join(paragraphs[-1].split()) if paragraphs else ""


_ALIASES = {"Airspace Opacity": "Lung Opacity", "No Findings": "No Finding"}
_REPORT_COLUMNS = ("Reports", "Report Impression")
_CSV_VALUES = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "-1": -1.0, "-1.0": -1.0, "": np.nan}


def read_label_csv(path) -> tuple[list[str], np.ndarray]:
    """Labels written by the official CheXpert labeler ("Reports" column) or CheXbert ("Report
    Impression") -> (report texts, float array [n, 14] in CHEXPERT_LABELS order, nan for blank).
    Columns are found by name in any order ("Airspace Opacity" is read as Lung Opacity)."""
    with user_files.csv_faults(path), open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [_ALIASES.get(h.strip(), h.strip()) for h in next(reader, [])]
        text_col = next((header.index(c) for c in _REPORT_COLUMNS if c in header), None)
        user_files.check_columns(path, header, ([] if text_col is not None else ["Reports"]) + list(CHEXPERT_LABELS),
                                 "the CheXpert labeler / CheXbert output header")
        index = [header.index(c) for c in CHEXPERT_LABELS]
        reports, rows = [], []
        for n, row in enumerate(reader, 2):
            if not row:
                continue
            cells = [row[i].strip() if i < len(row) else "" for i in index]
            bad = [c for c in cells if c not in _CSV_VALUES]
            if bad:
                raise UsageError(f"{path} line {n}: label value {bad[0]!r} is not 1, 0, -1 or blank")
            reports.append(row[text_col] if text_col < len(row) else "")
            rows.append([_CSV_VALUES[c] for c in cells])
    return reports, np.asarray(rows, dtype=np.float64).reshape(len(rows), len(CHEXPERT_LABELS))
