"""LM batches: epoch completeness, process shards, packing equals padding, resume, filters, mixture."""
import collections
import json

import grain
import numpy as np
import pytest
from lm_helpers import CODES, K, make_corpus, make_tokenizer

from llmcxr_jax import vocab
from llmcxr_jax.data import lm_batches, packing, prompts
from llmcxr_jax.data.lm_batches import ImageTextExample, LmBatches, TextExample
from llmcxr_jax.data.text_corpora import VqaExample
from llmcxr_jax.vocab import VocabLayout

BASE = {"seq_len": 192, "max_length": 192, "batch_size": 4, "max_examples_per_row": 6, "seed": 3,
        "codes_per_image": CODES}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(str(tmp_path_factory.mktemp("tok")))[:2]


def _pipeline(tok, shard=(0, 1), corpus=None, **overrides):
    tokenizer, special = tok
    image_text, vqa, text, codes = corpus or make_corpus()
    layout = VocabLayout.create(vocab.text_size(tokenizer), K)
    return LmBatches(tokenizer, special, layout, image_text=image_text, vqa=vqa, text=text, codes=codes,
                     config={**BASE, **overrides}, shard=grain.sharding.ShardOptions(*shard))


def _epoch_ids(batches):
    ids = np.concatenate([b["example_ids"].ravel() for b in batches])
    return ids[ids >= 0]


def test_batch_format_and_row_invariants(tok):
    p = _pipeline(tok)
    batches = list(p.iterator(num_epochs=1))
    shapes = {"input_ids": np.int32, "targets": np.int32, "loss_mask": np.float32, "segment_ids": np.int32,
              "positions": np.int32, "modality": np.int8}
    assert packing.BATCH_SPEC == shapes  # the one spec the train step and compile-check read
    assert set(packing.EXAMPLE_KEYS) | set(packing.ROW_LAYOUT_KEYS) == set(shapes)
    for b in batches:
        assert set(b) == set(shapes) | {"example_ids"}
        for k, dt in shapes.items():
            assert b[k].shape == (4, 192) and b[k].dtype == dt, k
        assert b["example_ids"].shape == (4, 6) and b["example_ids"].dtype == np.int32
        pad = b["segment_ids"] == 0
        assert not b["loss_mask"][pad].any() and (b["input_ids"][pad] == tok[1].pad_id).all()
        np.testing.assert_array_equal(b["modality"], (b["targets"] >= vocab.text_size(tok[0])).astype(np.int8))
        for r in range(4):  # segments numbered 1..n in order, one example id per segment
            segs = b["segment_ids"][r][b["segment_ids"][r] > 0]
            n = len(np.unique(segs))
            assert (np.unique(segs) == np.arange(1, n + 1)).all() and (b["example_ids"][r, :n] >= 0).all()
            assert (b["example_ids"][r, n:] == -1).all()
    # packing puts several examples in a row
    assert max((b["example_ids"] >= 0).sum(1).max() for b in batches) > 1


def test_epoch_has_every_example_once_and_processes_split_it(tok):
    whole = _pipeline(tok)
    ids = _epoch_ids(list(whole.iterator(num_epochs=1)))
    assert len(ids) == len(set(ids.tolist())) == whole.epoch_size
    assert set(ids.tolist()) == set(whole.local_example_ids(0).tolist()) == set(range(whole.epoch_size))
    shards = [_pipeline(tok, shard=(i, 2)) for i in range(2)]
    got = [_epoch_ids(list(s.iterator(num_epochs=1))) for s in shards]
    assert shards[0].rows_per_batch == 2 and shards[0].epoch_size == whole.epoch_size
    assert not set(got[0].tolist()) & set(got[1].tolist())
    assert sorted(np.concatenate(got).tolist()) == list(range(whole.epoch_size))
    for s, g in zip(shards, got):
        assert sorted(g.tolist()) == sorted(s.local_example_ids(0).tolist())
    # a second epoch is a different shuffle of the same plan sizes, ids continue
    two = _epoch_ids(list(whole.iterator(num_epochs=2)))
    assert sorted(two.tolist()) == list(range(2 * whole.epoch_size))


def test_packed_row_matches_padded_examples(tok):
    packed = list(_pipeline(tok).iterator(num_epochs=1))
    padded = list(_pipeline(tok, packing=False).iterator(num_epochs=1))
    ref = {}
    for b in padded:
        assert (b["segment_ids"] <= 1).all() and b["example_ids"].shape[1] == 1
        for r, eid in enumerate(b["example_ids"][:, 0]):
            if eid >= 0:
                ref[int(eid)] = {k: b[k][r] for k in b if k != "example_ids"}
    seen = 0
    for b in packed:
        for r in range(b["input_ids"].shape[0]):
            for k, eid in enumerate(b["example_ids"][r]):
                if eid < 0:
                    continue
                sel = b["segment_ids"][r] == k + 1
                n = int(sel.sum())
                want = ref[int(eid)]
                assert (want["segment_ids"][:n] == 1).all() and (want["segment_ids"][n:] == 0).all()
                for key in ("input_ids", "targets", "loss_mask", "positions", "modality"):
                    np.testing.assert_array_equal(b[key][r][sel], want[key][:n], err_msg=key)
                seen += 1
    assert seen == len(ref) > 0


def test_task_prompts_and_example_lookup(tok):
    p = _pipeline(tok)
    counts = collections.Counter()
    for eid in p.local_example_ids(0):
        ref = p.describe(eid)
        text, codes = p.example(eid)
        counts[ref.task] += 1
        if ref.task == "cxr_to_report":
            assert prompts.IMAGE_MARKER in text.split("Input:\n")[1] and codes is not None
            assert any(f"### Instruction:\n{s}\n" in text for s in prompts.REPORT_INSTRUCTIONS)
        elif ref.task == "report_to_cxr":
            assert text.endswith("### Response:\n<image>\n\n### End")
            assert any(f"### Instruction:\n{s}\n" in text for s in prompts.IMAGE_INSTRUCTIONS)
        elif ref.task == "vqa":
            assert "### Instruction:\nIs there a pleural effusion?" in text
        else:
            assert ref.dicom_id == "" and codes is None and "Where is lesion" in text
        if ref.task != "text":
            np.testing.assert_array_equal(codes, make_corpus()[3][ref.dicom_id])
    assert set(counts) == set(lm_batches.TASKS)


def test_resume_from_saved_state_gives_the_remaining_batches(tok):
    it = _pipeline(tok, max_length=86, max_examples_per_row=2).iterator(num_epochs=2)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what grain's orbax handler writes
    rest = list(it)
    fresh = _pipeline(tok, max_length=86, max_examples_per_row=2).iterator(num_epochs=2)
    fresh.set_state(state)
    again = list(fresh)
    assert len(again) == len(rest) > 3
    for a, b in zip(again, rest):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert fresh.dropped == it.dropped and sum(it.dropped.values()) > 0


def test_orbax_saves_and_restores_the_iterator(tok, tmp_path):
    import orbax.checkpoint as ocp

    it = _pipeline(tok).iterator(num_epochs=1)
    next(it), next(it)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        mngr.save(7, args=ocp.args.Composite(data_iter=lm_batches.checkpoint_args(it)))
        mngr.wait_until_finished()
    rest = list(it)
    fresh = _pipeline(tok).iterator(num_epochs=1)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        mngr.restore(7, args=ocp.args.Composite(data_iter=lm_batches.checkpoint_args(fresh, restore=True)))
    again = list(fresh)
    assert len(again) == len(rest) > 0
    for a, b in zip(again, rest):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["example_ids"], b["example_ids"])


def test_worker_processes_give_the_same_batches(tok):
    want = list(_pipeline(tok).iterator(num_epochs=1))
    it = _pipeline(tok, num_workers=1).iterator(num_epochs=1)
    try:
        got = list(it)
    finally:
        it.close()
    assert len(got) == len(want)
    for a, b in zip(got, want):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_bad_codes_are_skipped_and_too_long_examples_dropped(tok):
    image_text, vqa, text, codes = make_corpus()
    codes = dict(codes, short=np.zeros(CODES - 1, np.uint16), big=np.full(CODES, K, np.uint16))
    image_text = image_text + [ImageTextExample("short", "Clear."), ImageTextExample("big", "Clear."),
                               ImageTextExample("nocodes", "Clear."), ImageTextExample("d000", "  "),
                               ImageTextExample("d000", "See <image>.")]
    vqa = vqa + [VqaExample("nocodes", "1", "2", "Is it clear?", "yes", None),
                 {"dicom_id": "d001", "question": "", "answer": "x"}]
    long = TextExample("Describe everything.", "", " ".join(["lungs are clear"] * 80))
    text = text + [long, {"instruction": "Say hi.", "context": "", "response": ""}]
    p = _pipeline(tok, corpus=(image_text, vqa, text, codes))
    assert p.skipped == {("image_text", "wrong code length"): 1, ("image_text", "code outside codebook"): 1,
                         ("image_text", "missing codes"): 1, ("image_text", "empty report"): 1,
                         ("image_text", "text contains an image marker"): 1,
                         ("vqa", "missing codes"): 1, ("vqa", "empty question or answer"): 1,
                         ("text", "empty instruction or response"): 1}
    assert len(p.pools["image_text"]) == 12 and len(p.pools["vqa"]) == 8 and len(p.pools["text"]) == 7
    plan = p.epoch_plan(0)
    long_slots = {i for i in range(p.epoch_size) if plan.task[i] == 3 and plan.source[i] == 6}
    assert long_slots
    it = p.iterator(num_epochs=1)
    ids = _epoch_ids(list(it))
    assert it.dropped == {"text": len(long_slots)}
    assert sorted(ids.tolist()) == sorted(set(range(p.epoch_size)) - long_slots)


def test_mixture_frequencies_and_determinism(tok):
    p = _pipeline(tok, epoch_size=20000)
    plan = p.epoch_plan(0)
    want = np.array([lm_batches.STAGE1_MIXTURE[t] for t in lm_batches.TASKS])
    np.testing.assert_allclose(np.bincount(plan.task, minlength=4) / p.epoch_size, want, atol=1e-4)
    for window in (plan.task[:2000], plan.task[-2000:]):  # shuffled: any stretch follows the mix
        np.testing.assert_allclose(np.bincount(window, minlength=4) / 2000, want, atol=0.04)
    para = plan.paraphrase[plan.task == 0]
    assert para.min() == 0 and para.max() == 9 and np.bincount(para).min() > 0.07 * len(para)
    assert (plan.paraphrase[plan.task >= 2] == 0).all()
    # image pools (12 items) are used evenly: whole permutations per cycle
    src = np.bincount(plan.source[plan.task == 0], minlength=12)
    assert src.max() - src.min() <= 1
    same = _pipeline(tok, epoch_size=20000).epoch_plan(0)
    other = _pipeline(tok, epoch_size=20000, seed=4).epoch_plan(0)
    for a, b in ((plan.task, same.task), (plan.source, same.source), (plan.paraphrase, same.paraphrase)):
        np.testing.assert_array_equal(a, b)
    assert (plan.task != other.task).any() and (plan.task != p.epoch_plan(1).task).any()
    custom = _pipeline(tok, epoch_size=1000, mixture={"cxr_to_report": 1.0, "vqa": 1.0})
    assert np.bincount(custom.epoch_plan(0).task, minlength=4).tolist() == [500, 0, 500, 0]


def test_default_epoch_visits_every_pool_item(tok):
    p = _pipeline(tok)  # pools 12 / 12 / 8 / 6 at 0.3 / 0.3 / 0.2 / 0.2 -> 40 slots
    assert p.epoch_size == 40
    plan = p.epoch_plan(0)
    for t, size in enumerate((12, 12, 8, 6)):
        assert set(plan.source[plan.task == t].tolist()) == set(range(size))


def test_config_errors(tok):
    with pytest.raises(ValueError, match="unknown LM data config keys \\['seqlen'\\]"):
        _pipeline(tok, seqlen=5)
    with pytest.raises(ValueError, match="max_length <= seq_len"):
        _pipeline(tok, max_length=500)
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        _pipeline(tok, shard=(0, 3))
    with pytest.raises(ValueError, match="task vqa has mixture weight 0.20 but no usable examples"):
        image_text, _, text, codes = make_corpus()
        _pipeline(tok, corpus=(image_text, [], text, codes))
    with pytest.raises(ValueError, match="mixture must map tasks"):
        _pipeline(tok, mixture={"reports": 1.0})
    with pytest.raises(ValueError, match="add them with prompts.add_image_delimiters"):
        _pipeline(tok, image_delimiters="special")
    p = _pipeline(tok, corpus=(make_corpus()[0], [], [], make_corpus()[3]),
                  mixture={"cxr_to_report": 1, "report_to_cxr": 1})
    assert {p.describe(e).task for e in p.local_example_ids(0)} == {"cxr_to_report", "report_to_cxr"}


def test_stage_text_from_records():
    from types import SimpleNamespace as R

    recs = [R(dicom_id="a", findings="Clear lungs.", impression="Normal."),
            R(dicom_id="b", findings=None, impression="Normal."), R(dicom_id="c", findings="Clear.", impression=None)]
    assert [e.report for e in lm_batches.image_text_examples(recs, 1)] == ["Clear lungs. Normal.", "Normal.", "Clear."]
    assert [e.report for e in lm_batches.image_text_examples(recs, 2)] == ["Normal.", "Normal.", ""]


def _instruction_of(text):
    return text.split("### Instruction:\n", 1)[1].split("\n\n", 1)[0]


@pytest.mark.parametrize("stage", [1, 2])
def test_config_instruction_keys_are_what_batches_draw_from(tok, tmp_path, stage):
    """data.report_instructions / data.image_instructions (stage 2 inherits them from stage 1) reach the
    batches through lm_data: every CXR->report / report->CXR prompt carries one of the file's made-up
    instructions, each of them is used, and the tokens in the batch are those prompts'."""
    from lm_run_helpers import STAGE1, STAGE2

    from llmcxr_jax import configs
    from llmcxr_jax.data import instructions
    from llmcxr_jax.train import lm_data

    report = ["Jot down what this film shows.", "Report on the radiograph as a resident would."]
    image = ["Sketch a chest film for this text.", "Render the described chest.", "Draw what the note says."]
    (tmp_path / "report.txt").write_text("\n".join(report) + "\n")
    instructions.write_instructions({"image": image}, str(tmp_path / "folder"))  # the extract-instructions layout
    cfg = configs.load_config(f"{STAGE1 if stage == 1 else STAGE2}:tiny", [
        f"--config.data.report_instructions={tmp_path / 'report.txt'}",
        f"--config.data.image_instructions={tmp_path / 'folder'}", "--config.data.epoch_size=120"])
    assert cfg.data.stage == stage
    tokenizer, special = tok
    image_text, vqa, text, codes = make_corpus()
    p = LmBatches(tokenizer, special, VocabLayout.create(vocab.text_size(tokenizer), K), image_text=image_text,
                  vqa=vqa, text=text, codes=codes, config=lm_data.batch_config(cfg.data, 4, CODES),
                  shard=grain.sharding.ShardOptions(0, 1))
    used = collections.defaultdict(set)
    for eid in p.local_example_ids(0):
        used[p.describe(eid).task].add(_instruction_of(p.example(eid)[0]))
    assert used["cxr_to_report"] == set(report) and used["report_to_cxr"] == set(image)
    ours = set(prompts.REPORT_INSTRUCTIONS) | set(prompts.IMAGE_INSTRUCTIONS)
    assert not ours & (used["vqa"] | used["text"])
    batch = next(p.iterator(num_epochs=1))
    for r in range(batch["input_ids"].shape[0]):
        for k, eid in enumerate(batch["example_ids"][r]):
            if eid >= 0:
                want = p.encoder.encode(*p.example(int(eid)))
                np.testing.assert_array_equal(batch["input_ids"][r][batch["segment_ids"][r] == k + 1], want)


def test_bad_instruction_file_fails_before_the_corpus_is_read(tmp_path):
    from lm_run_helpers import STAGE1

    from llmcxr_jax import configs
    from llmcxr_jax.train import lm_data

    (tmp_path / "codes").mkdir()
    (tmp_path / "blank.txt").write_text("\n\n")
    cfg = configs.load_config(f"{STAGE1}:tiny", [f"--config.data.root={tmp_path / 'no_corpus_here'}",
                                                 f"--config.data.codes={tmp_path / 'codes'}",
                                                 f"--config.data.image_instructions={tmp_path / 'blank.txt'}"])
    with pytest.raises(ValueError, match="data.image_instructions .*blank.txt holds no instructions"):
        lm_data.read_sources(cfg.data)
    cfg.data.image_instructions = str(tmp_path / "absent.txt")
    with pytest.raises(FileNotFoundError, match="data.image_instructions .*absent.txt does not exist"):
        lm_data.read_sources(cfg.data)
