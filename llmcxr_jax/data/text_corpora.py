"""The text corpora LLM-CXR trains on beside the reports: the medVQA question files
(one Python-literal list per study, read with ast.literal_eval, never eval) and
databricks-dolly-15k. Bad files and rows are counted and listed, never fatal.
"""
from __future__ import annotations

import ast
import collections
import dataclasses
import json
import re
from pathlib import Path

from llmcxr_jax.errors import MissingInputError

VQA_DIR = "mimic-cxr-jpg_medvqa_v1"
_SUBJECT_DIR = re.compile(r"p(\d+)")
_STUDY_FILE = re.compile(r"s(\d+)\.txt")


@dataclasses.dataclass(frozen=True)
class VqaItem:
    subject_id: str
    study_id: str
    question: str
    answer: str
    question_type: str | None   # presence | location | severity ..., None when absent


@dataclasses.dataclass(frozen=True)
class VqaExample:
    """One question joined to one image of its study."""
    dicom_id: str
    subject_id: str
    study_id: str
    question: str
    answer: str
    question_type: str | None


@dataclasses.dataclass
class ReadResult:
    items: list
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    skipped_items: list[dict] = dataclasses.field(default_factory=list)   # {where, reason, detail}

    def skip(self, where: str, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        self.skipped_items.append({"where": where, "reason": reason, "detail": detail[:200]})


def _vqa_items(path: Path, subject: str, study: str, result: ReadResult) -> None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        return result.skip(str(path), "unreadable file", str(e))
    try:
        # literal_eval only builds literals: a call such as __import__('os') is a ValueError.
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        return result.skip(str(path), "not a python literal", f"{type(e).__name__}: {e}")
    if not isinstance(value, list):
        return result.skip(str(path), "not a list", type(value).__name__)
    for i, item in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(item, dict):
            result.skip(where, "item not a dict", type(item).__name__)
        elif not (isinstance(item.get("question"), str) and isinstance(item.get("answer"), str)):
            result.skip(where, "item without question and answer strings", repr(sorted(map(str, item))))
        else:
            kind = item.get("question_type")
            result.items.append(VqaItem(subject, study, item["question"], item["answer"],
                                        kind if isinstance(kind, str) else None))


def read_vqa(root) -> ReadResult:
    """ROOT/mimic-cxr-jpg_medvqa_v1/pXX/pSUBJECT/sSTUDY.txt (or that folder itself) -> VqaItems
    in path order. Unlike LLM-CXR, a dict needs only `question` and `answer` strings (extra or
    missing other keys are fine); malformed files and items are skipped, counted and listed."""
    root = Path(root)
    folder = root if root.name == VQA_DIR else root / VQA_DIR
    if not folder.is_dir():
        raise MissingInputError(f"VQA folder {folder} not found; put mimic-cxr-jpg_medvqa_v1 "
                                "(LLM-CXR's generated question files) under the MIMIC-CXR-JPG root")
    result = ReadResult([])
    for path in sorted(folder.rglob("*.txt")):
        subject, study = _SUBJECT_DIR.fullmatch(path.parent.name), _STUDY_FILE.fullmatch(path.name)
        if not (subject and study):
            result.skip(str(path), "not at pSUBJECT/sSTUDY.txt")
        else:
            _vqa_items(path, subject.group(1), study.group(1), result)
    return result


def vqa_for_records(vqa, records) -> list[VqaExample]:
    """Every VQA item paired with every record of its (subject, study), as LLM-CXR's merge does
    (a study with two selected images gives each question twice). LLM-CXR pairs questions with
    its PA/AP earliest-study images: pass mimic_cxr.vqa_image_records(corpus)."""
    items = vqa.items if isinstance(vqa, ReadResult) else vqa
    by_study = collections.defaultdict(list)
    for r in records:
        by_study[(r.subject_id, r.study_id)].append(r.dicom_id)
    return [VqaExample(dicom, q.subject_id, q.study_id, q.question, q.answer, q.question_type)
            for q in items for dicom in by_study.get((q.subject_id, q.study_id), ())]


def read_dolly(path) -> ReadResult:
    """databricks-dolly-15k.jsonl -> dicts {instruction, context, response, category}. Rows that
    are not JSON objects or lack a non-empty instruction or response are skipped and counted."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path} not found; download databricks-dolly-15k.jsonl "
                                "(huggingface.co/datasets/databricks/databricks-dolly-15k) and give its path")
    result = ReadResult([])
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                result.skip(f"{path}:{n}", "not json", str(e))
                continue
            if not isinstance(row, dict):
                result.skip(f"{path}:{n}", "not a json object", type(row).__name__)
            elif not all(isinstance(row.get(k), str) and row[k].strip() for k in ("instruction", "response")):
                result.skip(f"{path}:{n}", "missing instruction or response")
            else:
                result.items.append({"instruction": row["instruction"], "response": row["response"],
                                     "context": row.get("context") if isinstance(row.get("context"), str) else "",
                                     "category": row.get("category") if isinstance(row.get("category"), str) else ""})
    return result
