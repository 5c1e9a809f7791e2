"""Instructions as data: a user's instruction file read one way (lines or a JSON list) with one-line
refusals, the four tasks' prompts built from such a file byte for byte as LLM-CXR's Dolly template
writes them, the seeded choice per input, and `llmcxr extract-instructions` reading a stand-in for
LLM-CXR's training/mimiccxr_vq_dataset.py with ast only (its module-level code never runs).
Every sentence here is made up for the tests."""
import json

import grain
import pytest
from lm_helpers import K, make_corpus, make_tokenizer

from llmcxr_jax import cli, vocab
from llmcxr_jax.data import instructions, prompts
from llmcxr_jax.data.lm_batches import LmBatches
from llmcxr_jax.errors import MissingInputError, UsageError

BLURB = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
MADE_UP_REPORT = ("Kindly dictate the findings for the film shown.",
                  "Summarise this radiograph like a chest attending.",
                  "Describe the study below, findings then impression.")
MADE_UP_IMAGE = ("Paint a frontal chest film that fits this narrative.", "Turn the text below into a radiograph.")


def _training_text(instruction, response, input_text=None):
    """REFERENCE.md's template written out: the "Input:" block only when there is an input."""
    block = f"Input:\n{input_text}\n\n" if input_text else ""
    return f"{BLURB}\n\n### Instruction:\n{instruction}\n\n{block}### Response:\n{response}\n\n### End"


def _generation_text(instruction, input_text=None):
    block = f"Input:\n{input_text}\n\n" if input_text else ""
    return f"{BLURB}\n\n### Instruction:\n{instruction}\n\n{block}### Response:\n"


# ---------------------------------------------------------------- reading files
def test_instruction_files_as_lines_or_json(tmp_path):
    (tmp_path / "a.txt").write_text("  Kindly dictate the findings.  \r\n\n\tSummarise this film.\n"
                                    "Kindly dictate the findings.")
    assert instructions.load_instructions(str(tmp_path / "a.txt")) == (
        "Kindly dictate the findings.", "Summarise this film.", "Kindly dictate the findings.")  # repeats weigh
    exact = [" Leading space kept.", "Two\nlines kept."]
    (tmp_path / "b.json").write_text(json.dumps(exact))
    assert instructions.load_instructions(str(tmp_path / "b.json")) == tuple(exact)  # JSON strings are exact
    (tmp_path / "c.txt").write_text("\n" + json.dumps(["Looks like JSON, is JSON."]))
    assert instructions.load_instructions(str(tmp_path / "c.txt")) == ("Looks like JSON, is JSON.",)


@pytest.mark.parametrize("name, content, error, message", [
    ("nope.txt", None, MissingInputError, "nope.txt does not exist; give one instruction per line"),
    ("folder", "DIR", UsageError, "is a folder; give one instruction per line"),
    ("empty.txt", "", UsageError, "holds no instructions"),
    ("blank.txt", "\n   \n\t\n", UsageError, "holds no instructions"),
    ("dict.json", '{"a": "Say it."}', UsageError, "holds a JSON dict, not a list"),
    ("empty.json", "[]", UsageError, "holds no instructions"),
    ("number.json", '["Say it.", 3]', UsageError, "item 1 is 3, not a non-empty instruction string"),
    ("blank.json", '["Say it.", "  "]', UsageError, "item 1 is '  ', not a non-empty instruction string"),
    ("broken.json", '["Say it.",', UsageError, "is not valid JSON"),
    ("broken.txt", '["Say it.",\n', UsageError, "is not valid JSON"),
    ("latin1.txt", b"Caf\xe9 report.\n", UsageError, "is not UTF-8 text"),
    ("marker.txt", "Fine.\nDescribe <image> here.\n", UsageError, "line 2 contains '<image>'"),
    ("key.txt", "Write it.\n### Response: now\n", UsageError, "line 2 contains '### Response:'"),
])
def test_bad_instruction_files_are_one_line_errors(tmp_path, name, content, error, message):
    path = tmp_path / name
    if content == "DIR":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(error) as e:
        instructions.load_instructions(str(path), "x")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_task_instructions_ours_a_file_or_the_extracted_folder(tmp_path):
    assert instructions.task_instructions("", "report") == prompts.REPORT_INSTRUCTIONS
    assert instructions.task_instructions("", "image") == prompts.IMAGE_INSTRUCTIONS
    paths = instructions.write_instructions({"report": MADE_UP_REPORT, "image": MADE_UP_IMAGE}, str(tmp_path / "d"))
    assert instructions.task_instructions(paths["report"], "report") == MADE_UP_REPORT
    assert instructions.task_instructions(str(tmp_path / "d"), "image") == MADE_UP_IMAGE  # the folder's own file
    (tmp_path / "half").mkdir()
    with pytest.raises(MissingInputError, match="half is a folder without image_instructions.txt"):
        instructions.task_instructions(str(tmp_path / "half"), "image", "data.image_instructions")


def test_sampling_is_seeded_per_input_and_prefix_stable():
    a = instructions.sample(MADE_UP_REPORT, 300, 5, "report")
    assert a == instructions.sample(MADE_UP_REPORT, 300, 5, "report") and set(a) == set(MADE_UP_REPORT)
    assert instructions.sample(MADE_UP_REPORT, 40, 5, "report") == a[:40]  # more inputs do not reshuffle the first
    assert a != instructions.sample(MADE_UP_REPORT, 300, 6, "report")
    counts = [a.count(s) for s in MADE_UP_REPORT]
    assert min(counts) > 70  # uniform over three: 100 each
    # the two tasks draw independently for the same seed
    idx = [MADE_UP_REPORT.index(s) for s in a[:100]]
    other = [MADE_UP_REPORT.index(s) for s in instructions.sample(MADE_UP_REPORT, 100, 5, "image")]
    assert idx != other


def test_given_instructions_serve_the_report_and_image_tasks(tmp_path):
    paths = instructions.write_instructions({"report": MADE_UP_REPORT, "image": MADE_UP_IMAGE}, str(tmp_path / "d"))
    given = instructions.given_instructions(("report", "image", "vqa"), None, str(tmp_path / "d"))
    assert given == {"report": MADE_UP_REPORT, "image": MADE_UP_IMAGE}
    assert instructions.given_instructions(("image",), None, paths["report"]) == {"image": MADE_UP_REPORT}
    assert instructions.given_instructions(("report", "vqa"), "Say it.", None) == {"report": ("Say it.",)}
    assert instructions.given_instructions(("report",), None, None) == {}
    with pytest.raises(UsageError, match="gives one instruction list but tasks report and image both run"):
        instructions.given_instructions(("report", "image"), None, paths["report"])
    with pytest.raises(UsageError, match="--instruction applies to the report and image tasks, not vqa"):
        instructions.given_instructions(("vqa",), "Say it.", None)
    with pytest.raises(MissingInputError, match="--instructions .*absent does not exist"):
        instructions.given_instructions(("report",), None, str(tmp_path / "absent"))


# ---------------------------------------------------------------- (a) the four tasks' prompts, byte for byte
def test_four_task_prompts_from_a_user_file_match_the_template(tmp_path):
    (tmp_path / "report.txt").write_text("\n".join(MADE_UP_REPORT) + "\n")
    (tmp_path / "image.json").write_text(json.dumps(list(MADE_UP_IMAGE)))
    tok, special, _ = make_tokenizer(str(tmp_path / "tok"))
    image_text, vqa, text, codes = make_corpus()
    p = LmBatches(tok, special, vocab.VocabLayout.create(vocab.text_size(tok), K), image_text=image_text, vqa=vqa,
                  text=text, codes=codes, shard=grain.sharding.ShardOptions(0, 1),
                  config={"seq_len": 256, "max_length": 256, "batch_size": 1, "codes_per_image": 16, "seed": 1,
                          "epoch_size": 200, "report_instructions": str(tmp_path / "report.txt"),
                          "image_instructions": str(tmp_path / "image.json")})
    reports = {e.dicom_id: e.report for e in image_text}
    seen = {"cxr_to_report": set(), "report_to_cxr": set(), "vqa": False, True: False, False: False}
    for eid in p.local_example_ids(0):
        ref = p.describe(eid)
        got, _ = p.example(eid)
        if ref.task == "cxr_to_report":
            want = {i: _training_text(i, reports[ref.dicom_id], "<image>") for i in MADE_UP_REPORT}
        elif ref.task == "report_to_cxr":
            want = {i: _training_text(i, "<image>", reports[ref.dicom_id]) for i in MADE_UP_IMAGE}
        elif ref.task == "vqa":
            q = p.pools["vqa"][ref.source_index][0]
            want = {q.question: _training_text(q.question, q.answer, "<image>")}
        else:
            t = p.pools["text"][ref.source_index]
            want = {t.instruction: _training_text(t.instruction, t.response, t.context)}
        match = [i for i, w in want.items() if w == got]
        assert len(match) == 1, (ref.task, got)
        if ref.task in ("cxr_to_report", "report_to_cxr"):
            seen[ref.task].add(match[0])
        else:  # vqa; text with and without an "Input:" block (Dolly rows with and without context)
            seen[ref.task if ref.task == "vqa" else ("Input:" in got)] = True
    assert seen["cxr_to_report"] == set(MADE_UP_REPORT) and seen["report_to_cxr"] == set(MADE_UP_IMAGE)
    assert seen["vqa"] and seen[True] and seen[False]
    # generation prompts stop right after "### Response:\n" (the model writes the rest)
    ins = instructions.load_instructions(str(tmp_path / "report.txt"))[1]
    assert prompts.generation_prompt(ins, "<image>") == _generation_text(MADE_UP_REPORT[1], "<image>")
    assert prompts.generation_prompt(MADE_UP_IMAGE[0], "Small left effusion.") == (
        f"{BLURB}\n\n### Instruction:\n{MADE_UP_IMAGE[0]}\n\nInput:\nSmall left effusion.\n\n### Response:\n")
    assert prompts.generation_prompt("Name a rib.") == f"{BLURB}\n\n### Instruction:\nName a rib.\n\n### Response:\n"


# ---------------------------------------------------------------- (b) extract-instructions
FAKE_SOURCE = '''"""A stand-in for LLM-CXR's dataset module, with made-up sentences."""
import os
import random
from typing import List

from .consts import RESPONSE_KEY_NL

SENTINEL = {sentinel!r}
open(SENTINEL, "w").write("the module ran")  # extraction must never execute this


class Colors:
    RED = "\\033[91m"


CXR_VQ_OUTPUT_INSTRUCTION_LIST = [
    "Paint a frontal chest film that fits this narrative.",
    "Turn the text below into a radiograph."
    " Keep it plausible.",
]

CXR_VQ_INPUT_INSTRUCTION_LIST: List[str] = [
    "Kindly dictate the findings for the film shown.",
    'Summarise this radiograph like a chest attending.',
    "Describe the study \u2014 findings first, then impression.",
]

{tail}
CXR_VQ_VQ_REPLACE_TEMPLATE = "<image>"
OTHER = [x for x in range(3)]


def sample_input():
    return random.choice(CXR_VQ_INPUT_INSTRUCTION_LIST)
'''


def _fake_repo(tmp_path, tail="", replace=None):
    repo = tmp_path / "llm-cxr"
    (repo / "training").mkdir(parents=True, exist_ok=True)
    sentinel = tmp_path / "module_ran.txt"
    source = FAKE_SOURCE.replace("{sentinel!r}", repr(str(sentinel))).replace("{tail}", tail)
    if replace:
        source = source.replace(*replace)
    (repo / "training" / "mimiccxr_vq_dataset.py").write_text(source, encoding="utf-8")
    return repo, sentinel


def _extract(capsys, repo, out):
    code = cli.main(["extract-instructions", "--original-repo", str(repo), "--out", str(out)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_extract_instructions_reads_the_literals_without_running_the_module(capsys, tmp_path):
    repo, sentinel = _fake_repo(tmp_path)
    code, out, err = _extract(capsys, repo, tmp_path / "out")
    assert code == 0, err
    assert not sentinel.exists()  # the module-level open(...).write(...) never ran
    summary = json.loads(out.strip())
    assert summary["report_instructions"] == {"file": str(tmp_path / "out" / "report_instructions.txt"), "count": 3,
                                              "from": "CXR_VQ_INPUT_INSTRUCTION_LIST"}
    assert summary["image_instructions"]["count"] == 2
    assert summary["image_instructions"]["from"] == "CXR_VQ_OUTPUT_INSTRUCTION_LIST"
    # the image is the INPUT of CXR->report, the OUTPUT of report->CXR
    report = (tmp_path / "out" / "report_instructions.txt").read_text(encoding="utf-8")
    assert report == ("Kindly dictate the findings for the film shown.\nSummarise this radiograph like a chest "
                      "attending.\nDescribe the study \u2014 findings first, then impression.\n")
    image = instructions.task_instructions(str(tmp_path / "out"), "image")
    assert image == ("Paint a frontal chest film that fits this narrative.",
                     "Turn the text below into a radiograph. Keep it plausible.")  # adjacent literals join
    assert instructions.extract_original(str(repo)) == {"report": instructions.load_instructions(
        str(tmp_path / "out" / "report_instructions.txt")), "image": image}  # the files read back exactly


LIST = "CXR_VQ_INPUT_INSTRUCTION_LIST"
ASIDE = (f"{LIST}: List[str] = [", "UNUSED_SENTENCES: List[str] = [")  # the literal moved aside, the tail rebinds


@pytest.mark.parametrize("tail, replace, message", [
    (f"{LIST} = [s.upper() for s in UNUSED_SENTENCES]", ASIDE, "is bound to a list comprehension, not a literal"),
    (f"{LIST} = UNUSED_SENTENCES", ASIDE, "is bound to another name, not a literal list"),
    (f"{LIST} = list(UNUSED_SENTENCES)", ASIDE, "is bound to a function call"),
    (f"{LIST} = ['One sentence.'] + UNUSED_SENTENCES", ASIDE, "is bound to an expression"),
    (f"{LIST} = ('One sentence.', 'Another one.')", ASIDE, "is bound to a tuple"),
    (f"{LIST}, OTHER_NAME = UNUSED_SENTENCES, []", ASIDE, "is bound to a statement other than `NAME = [...]`"),
    ("", (ASIDE[0], f"{LIST} = ("), None),  # unbalanced brackets: a syntax error
    ("", ('"Kindly dictate the findings for the film shown."', 'f"Kindly {os.sep}"'), "is an f-string, not a string"),
    ("", ('"Kindly dictate the findings for the film shown."', "RESPONSE_KEY_NL"), "is another name, not a string"),
    ("", ('"Kindly dictate the findings for the film shown."', "*OTHER"), "is an unpacking, not a string"),
    (f"{LIST} += ['An extra sentence.']", None, f"binds {LIST} 2 times"),
    (f"{LIST}.append('An extra sentence.')", None, "is changed at module level after its literal"),
    (f"{LIST}[0] = 'Replaced.'", None, "is changed at module level after its literal"),
    (f"for {LIST} in [[]]:\n    pass", None, f"binds {LIST} 2 times"),
    (f"{LIST} = []", ASIDE, f"{LIST} is an empty list"),
    ("", (LIST, "RENAMED_LIST"), f"assigns no module-level {LIST}; give LLM-CXR's file"),
])
def test_extract_refuses_what_is_not_a_literal_list_of_strings(capsys, tmp_path, tail, replace, message):
    repo, sentinel = _fake_repo(tmp_path, tail, replace)
    code, out, err = _extract(capsys, repo, tmp_path / "out")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and not out, err
    assert (message or "is not Python that parses") in lines[0], lines[0]
    assert not sentinel.exists() and not (tmp_path / "out").exists()


def test_extract_names_the_missing_repo_or_file(capsys, tmp_path):
    code, _, err = _extract(capsys, tmp_path / "nowhere", tmp_path / "out")
    assert code == 2 and "--original-repo" in err and "is not a folder; give the root of a clone of LLM-CXR" in err
    (tmp_path / "empty_clone").mkdir()
    code, _, err = _extract(capsys, tmp_path / "empty_clone", tmp_path / "out")
    assert code == 2 and "has no training/mimiccxr_vq_dataset.py; give the root of a clone" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("items, message", [
    (["Fine.", "Two\nlines."], "has a line break"),
    (["Fine.", "Trailing space. "], "surrounding whitespace"),
    (["[Bracketed] first sentence."], "leading '['"),
    (["See <image> below."], "contains '<image>'"),
])
def test_lists_a_line_file_cannot_keep_are_refused(tmp_path, items, message):
    with pytest.raises(UsageError, match=message.replace("[", "\\[")):
        instructions.write_instructions({"report": items}, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
