"""LLM-CXR's data recipe beside ours (data/original_recipe.py, configs' "_original" variants): one direction per
image by index parity over the sorted split listing, the MIMIC 0.8 / Dolly 0.2 interleave by pool size with an
all_exhausted epoch, unpacked rows of one example at 16 per step, and its shipped id lists read safely."""
import csv
import gzip
import os
import pickle
import sys
import types

import grain
import mimic_fixture as fx
import numpy as np
import pytest
from lm_helpers import CODES, K, make_corpus, make_tokenizer
from lm_run_helpers import STAGE1, STAGE2, make_setup

from llmcxr_jax import configs, vocab
from llmcxr_jax.data import codes as code_files
from llmcxr_jax.data import lm_batches, mimic_cxr, original_recipe
from llmcxr_jax.data.lm_batches import LmBatches
from llmcxr_jax.errors import MissingInputError, UsageError
from llmcxr_jax.train import lm_data

DATA = os.path.join(os.path.dirname(__file__), "data")
# Made with pandas 2.1.1 (LLM-CXR's environment.yaml) and pickle protocol 4: {dicom_id: row} for the rows of a
# metadata-like DataFrame (str, int, float and datetime64 columns), from `dict(df.iterrows())`.
PANDAS_SELECTION = os.path.join(DATA, "selection_pandas_2.1.1.pickle")


# ---------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(str(tmp_path_factory.mktemp("tok")))[:2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(str(tmp_path_factory.mktemp("recipe")), num_images=64, seed=3)


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    return fx.write_corpus(tmp_path_factory.mktemp("mimic"))


def _pipeline(tok, corpus, **config):
    tokenizer, special = tok
    image_text, vqa, text, codes = corpus
    base = {"seq_len": 192, "max_length": 192, "batch_size": 4, "max_examples_per_row": 6, "seed": 3,
            "codes_per_image": CODES}
    return LmBatches(tokenizer, special, vocab.VocabLayout.create(vocab.text_size(tokenizer), K),
                     image_text=image_text, vqa=vqa, text=text, codes=codes, config={**base, **config},
                     shard=grain.sharding.ShardOptions(0, 1))


def _config(setup, variant="tiny", *overrides, stage=1):
    return configs.load_config(f"{STAGE1 if stage == 1 else STAGE2}:{variant}", [
        f"--config.data.root={setup['root']}", f"--config.data.codes={setup['codes']}",
        f"--config.data.tokenizer={setup['tokenizer']}", "--config.model.image_codes=64",
        "--config.data.dolly_eval_rows=20", *overrides])


def _split_csv_ids(root, splits):
    """The split csv read on its own: sorted dicom ids of `splits` (LLM-CXR's numbering order)."""
    with gzip.open(os.path.join(root, "mimic-cxr-2.0.0-split.csv.gz"), "rt") if os.path.exists(
            os.path.join(root, "mimic-cxr-2.0.0-split.csv.gz")) else open(
            os.path.join(root, "mimic-cxr-2.0.0-split.csv")) as f:
        return sorted({row["dicom_id"] for row in csv.DictReader(f) if row["split"] in splits})


def _tokenizer_of(setup):
    tok, special, _ = vocab.load_tokenizer(setup["tokenizer"])
    return tok, special, vocab.VocabLayout.create(vocab.text_size(tok), 64)


def _plan_counts(pipe):
    plan = pipe.epoch_plan(0)
    return {t: np.bincount(plan.source[plan.task == i], minlength=pipe.pool_sizes[t])
            for i, t in enumerate(lm_batches.TASKS)}


# ---------------------------------------------------------------- 1. one direction per image by index parity
def test_parity_follows_the_original_loop_over_the_whole_listing():
    """MimicCxrVqDataset numbers sorted(split ids - ids with bad codes) and skips unusable ones after numbering."""
    listed = ["e5", "a1", "c3", "b2", "d4", "f6", "g7"]
    bad = {"c3"}  # failed its code check: not numbered

    def original(ids, bad_codes, usable):  # the loop restated: i counts every numbered id, used or not
        out = {}
        for i, d in enumerate(sorted(set(ids) - bad_codes)):
            if d in usable:
                out[d] = "input" if i % 2 == 0 else "output"
        return out

    usable = {"a1", "d4", "e5", "g7"}  # b2, f6: e.g. no report or outside the stage-2 selection
    want = {d: {"input": "cxr_to_report", "output": "report_to_cxr"}[io] for d, io in original(listed, bad,
                                                                                                 usable).items()}
    got = original_recipe.parity_directions(listed, bad)
    assert {d: got[d] for d in usable} == want == {"a1": "cxr_to_report", "d4": "cxr_to_report",
                                                   "e5": "report_to_cxr", "g7": "report_to_cxr"}
    assert "c3" not in got
    # without the exclusion every id after c3 flips: the bad-code list matters
    assert original_recipe.parity_directions(listed)["d4"] == "report_to_cxr"


@pytest.mark.parametrize("stage", [1, 2])
def test_parity_gives_each_image_one_task_by_its_place_in_the_split_listing(setup, stage):
    sources = lm_data.read_sources(_config(setup, "tiny", "--config.data.directions=parity", stage=stage).data)
    for split, splits in (("train", ("train",)), ("held_out", ("validate", "test"))):
        order = {d: i for i, d in enumerate(_split_csv_ids(setup["root"], splits))}
        images = getattr(sources, split)["image_text"]
        assert images and {e.direction for e in images} == {"cxr_to_report", "report_to_cxr"}
        for e in images:
            assert e.direction == ("cxr_to_report" if order[e.dicom_id] % 2 == 0 else "report_to_cxr"), e.dicom_id
    both = lm_data.read_sources(_config(setup, "tiny", stage=stage).data)
    assert {e.direction for e in both.train["image_text"]} == {"both"}
    # the pipeline draws each image only for its own task
    tok, special, layout = _tokenizer_of(setup)
    cfg = _config(setup, "tiny", "--config.data.directions=parity", "--config.data.epoch_size=400", stage=stage)
    pipe = lm_data.make_batches(sources, "train", tok, special, layout, cfg.data, 8,
                                shard=grain.sharding.ShardOptions(0, 1))
    way = {e.dicom_id: e.direction for e in sources.train["image_text"]}
    seen = {t: set() for t in lm_batches.IMAGE_TASKS}
    for eid in pipe.local_example_ids(0):
        ref = pipe.describe(eid)
        if ref.task in lm_batches.IMAGE_TASKS:
            assert way[ref.dicom_id] == ref.task
            seen[ref.task].add(ref.dicom_id)
    assert seen == {t: {d for d, w in way.items() if w == t} for t in lm_batches.IMAGE_TASKS}
    assert pipe.pool_sizes["cxr_to_report"] + pipe.pool_sizes["report_to_cxr"] == len(sources.train["image_text"])


def test_parity_skips_ids_whose_codes_failed_the_check(setup, tmp_path):
    """An image whose codes are the wrong length is left out of the numbering, as LLM-CXR's _check_vq does,
    so every later image of the listing changes direction."""
    corpus = mimic_cxr.load_corpus(setup["root"], progress=False)
    table = code_files.read_codes(setup["codes"])
    train = _split_csv_ids(setup["root"], ("train",))
    victim = train[len(train) // 3]
    data = {i: table[i].tolist() for i in table}
    data[victim] = data[victim][:-1]
    with open(tmp_path / "codes.pickle", "wb") as f:
        pickle.dump(data, f)
    code_files.import_pickle(str(tmp_path / "codes.pickle"), str(tmp_path / "codes"), codes_per_image=CODES,
                             codebook_size=64)
    cfg = _config(setup, "tiny", "--config.data.directions=parity", f"--config.data.codes={tmp_path / 'codes'}")
    got = {e.dicom_id: e.direction for e in lm_data.read_sources(cfg.data).train["image_text"]}
    want = original_recipe.parity_directions(train, {victim})
    assert got == {d: want.get(d, "both") for d in got}
    after = [d for d in train if d > victim and d in got]
    assert after and all(got[d] != original_recipe.parity_directions(train)[d] for d in after)
    assert victim in {r.dicom_id for r in corpus.stage1}


# ---------------------------------------------------------------- 2. LLM-CXR's interleave and its epoch
def _all_exhausted(sizes, probabilities, seed):
    """datasets.interleave_datasets(..., stopping_strategy="all_exhausted") restated: draw a source by
    probability, take its next example, restart a source that ran out; stop once every source ran out."""
    rng = np.random.default_rng(seed)
    taken, exhausted, position = np.zeros(len(sizes), int), np.zeros(len(sizes), bool), np.zeros(len(sizes), int)
    while not exhausted.all():
        s = rng.choice(len(sizes), p=probabilities)
        taken[s] += 1
        position[s] += 1
        if position[s] == sizes[s]:
            exhausted[s], position[s] = True, 0
    return taken


@pytest.mark.parametrize("n_vqa, n_text", [(40, 6), (40, 60)])
def test_original_mix_is_the_interleave_by_pool_size_and_an_all_exhausted_epoch(tok, n_vqa, n_text):
    corpus = make_corpus(n_images=12, n_vqa=n_vqa, n_text=n_text)
    p = _pipeline(tok, corpus, mix="original")
    mimic = 12 + 12 + n_vqa  # both directions: each image is two examples of the concatenation
    want = {"cxr_to_report": 0.8 * 12 / mimic, "report_to_cxr": 0.8 * 12 / mimic, "vqa": 0.8 * n_vqa / mimic,
            "text": 0.2}
    assert p.task_weights == pytest.approx(want)
    assert p.epoch_size == int(np.ceil(max(mimic / 0.8, n_text / 0.2)))
    counts = _plan_counts(p)
    larger = "mimic" if mimic / 0.8 >= n_text / 0.2 else "text"
    for t, c in counts.items():
        assert c.min() >= 1, t  # every pool is exhausted at least once
        if (t == "text") == (larger == "text"):
            assert (c == 1).all(), t  # the pool that ends the epoch is seen exactly once
        else:
            assert c.max() - c.min() <= 1, t  # the other repeats evenly
    # the restated interleave takes as many examples per source on average
    draws = np.mean([_all_exhausted([mimic, n_text], [0.8, 0.2], seed) for seed in range(300)], axis=0)
    ours = [sum(counts[t].sum() for t in ("cxr_to_report", "report_to_cxr", "vqa")), counts["text"].sum()]
    np.testing.assert_allclose(ours, draws, rtol=0.06)
    fixed = _pipeline(tok, corpus)
    assert fixed.task_weights == pytest.approx(lm_batches.STAGE1_MIXTURE)


def test_original_mix_keeps_out_the_tasks_the_mixture_sets_to_zero_and_counts_parity_pools(tok):
    image_text, vqa, text, codes = make_corpus(n_images=12, n_vqa=40, n_text=6)
    p = _pipeline(tok, (image_text, vqa, text, codes), mix="original",
                  mixture={"cxr_to_report": 1, "report_to_cxr": 1, "vqa": 0, "text": 1})
    assert p.task_weights == pytest.approx({"cxr_to_report": 0.4, "report_to_cxr": 0.4, "vqa": 0.0, "text": 0.2})
    one_way = [lm_batches.ImageTextExample(e.dicom_id, e.report, "cxr_to_report" if i < 9 else "report_to_cxr")
               for i, e in enumerate(image_text)]
    p = _pipeline(tok, (one_way, vqa, text, codes), mix="original")
    assert p.pool_sizes == {"cxr_to_report": 9, "report_to_cxr": 3, "vqa": 40, "text": 6}
    assert p.task_weights == pytest.approx({"cxr_to_report": 0.8 * 9 / 52, "report_to_cxr": 0.8 * 3 / 52,
                                            "vqa": 0.8 * 40 / 52, "text": 0.2})
    with pytest.raises(UsageError, match="task text has mixture weight 0.20 but no usable examples"):
        _pipeline(tok, (image_text, vqa, [], codes), mix="original")
    with pytest.raises(UsageError, match="mix must be one of .*'fixed', 'original'.*got 'paper'"):
        _pipeline(tok, (image_text, vqa, text, codes), mix="paper")
    with pytest.raises(UsageError, match="direction 'sideways'"):
        _pipeline(tok, ([lm_batches.ImageTextExample("d000", "Clear.", "sideways")], vqa, text, codes))


# ---------------------------------------------------------------- 3. unpacked rows, 16 per step
def test_packing_off_gives_rows_of_one_example_and_the_same_examples(tok):
    corpus = make_corpus()
    packed = list(_pipeline(tok, corpus, batch_size=16).iterator(num_epochs=1))
    padded = list(_pipeline(tok, corpus, batch_size=16, packing=False).iterator(num_epochs=1))
    for b in padded:
        assert b["input_ids"].shape == (16, 192) and b["example_ids"].shape == (16, 1)
        assert (b["segment_ids"] <= 1).all()
    assert all((b["example_ids"] >= 0).all() for b in padded[:-1])  # 16 examples per step
    assert max((b["example_ids"] >= 0).sum() for b in packed) > 16

    def ids(batches):
        return sorted(int(i) for b in batches for i in b["example_ids"].ravel() if i >= 0)

    assert ids(packed) == ids(padded)
    assert len(padded) == -(-len(ids(padded)) // 16) > len(packed)


# ---------------------------------------------------------------- 4. LLM-CXR's shipped id lists
def test_pandas_valued_selection_pickle_is_read_without_pandas():
    """Series values call pandas's rebuild functions (_new_Index, _unpickle_timestamp, ...): safe_pickle alone
    refuses them; original_recipe records them inertly and keeps the keys."""
    from llmcxr_jax import safe_pickle

    with open(PANDAS_SELECTION, "rb") as f, pytest.raises(safe_pickle.RefusedGlobal, match="pandas"):
        safe_pickle.load(f, stand_ins=True, allowed={**safe_pickle.DATA_GLOBALS, **safe_pickle.numpy_globals()})
    ids = original_recipe.read_id_list(PANDAS_SELECTION, "stage2_list")
    assert ids == {"d11a", "d21a", "d31a", "d71a", "d91a", "d92a", "d101a", "d112a", "absent-1", "absent-2"}


def test_given_lists_replace_the_rebuilt_selections_and_count_absent_ids(fixture_root, tmp_path):
    rebuilt = mimic_cxr.load_corpus(fixture_root, progress=False)
    selection = original_recipe.read_id_list(PANDAS_SELECTION, "stage2_list")
    corpus = mimic_cxr.load_corpus(fixture_root, progress=False, pa_ap_earliest=selection)
    # a later study of subject 10000001 (d11a) instead of the rebuilt earliest one (d12a, d12b)
    assert [r.dicom_id for r in rebuilt.stage2] == ["d12a", "d12b", "d21a", "d71a"]
    assert [r.dicom_id for r in corpus.stage2] == ["d11a", "d21a", "d71a"]  # d31a has no impression
    assert [r.dicom_id for r in corpus.evaluation] == ["d91a", "d92a", "d101a", "d112a"]
    assert [r.dicom_id for r in mimic_cxr.vqa_image_records(corpus)] == ["d11a", "d21a", "d31a", "d71a"]
    assert corpus.summary()["stage2_list"] == {"listed": 10, "not_in_corpus": 2,
                                               "not_in_corpus_first": ["absent-1", "absent-2"]}
    assert "stage2_list" not in rebuilt.summary() and "eval_list" not in rebuilt.summary()
    # the evaluation list: only validate/test PA/AP images with an impression; the rest counted as skipped
    with open(tmp_path / "eval.pickle", "wb") as f:
        pickle.dump(["d92a", "d91a", "d11a", "d91b", "d111a", "gone"], f)
    ids = original_recipe.read_id_list(str(tmp_path / "eval.pickle"), "eval_list")
    listed = mimic_cxr.load_corpus(fixture_root, progress=False, evaluation_ids=ids)
    assert [r.dicom_id for r in mimic_cxr.evaluation_records(listed)] == ["d91a", "d92a"]
    assert [r.dicom_id for r in listed.stage2] == [r.dicom_id for r in rebuilt.stage2]
    skipped = {(s.dicom_id, s.reason) for s in listed.skipped}
    assert {("d11a", mimic_cxr.NOT_EVALUATION_IMAGE), ("d91b", mimic_cxr.NOT_EVALUATION_IMAGE),
            ("d111a", mimic_cxr.NO_IMPRESSION)} <= skipped
    assert listed.summary()["eval_list"] == {"listed": 6, "not_in_corpus": 1, "not_in_corpus_first": ["gone"]}


def _fake_class_pickle(module, name, payload):
    """A pickle of an object whose class lives in a module this process does not have."""
    parts = module.split(".")
    names = [".".join(parts[:i + 1]) for i in range(len(parts))]  # the module and its parent packages
    cls = type(name, (), {"__module__": module, "__reduce__": lambda self: (cls, ())})
    for n in names:
        sys.modules[n] = types.ModuleType(n)
    setattr(sys.modules[module], name, cls)
    try:
        return pickle.dumps(payload(cls()))
    finally:
        for n in names:
            del sys.modules[n]


def test_bad_lists_fail_in_one_line_naming_key_reason_and_fix(tmp_path):
    def write(name, obj=None, raw=None):
        path = tmp_path / name
        path.write_bytes(raw if raw is not None else pickle.dumps(obj))
        return str(path)

    marker = tmp_path / "RAN"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    cases = [
        (str(tmp_path / "absent.pickle"), MissingInputError, r"data.stage2_list .*absent.pickle does not exist; "
                                                             r"give LLM-CXR's mimic-cxr-2.0.0-selected"),
        (write("evil.pickle", {"d1": Evil()}), UsageError, r"was refused, nothing in it ran \(refusing (os|posix)"
                                                           r"\.system"),
        (write("number.pickle", 5), UsageError, "is a pickled int, not a list or dict of dicom id strings"),
        (write("ints.pickle", ["d1", 7]), UsageError, r"holds 7 \(int\), not a dicom id string"),
        (write("empty.pickle", {}), UsageError, "holds no dicom ids"),
        (write("junk.pickle", raw=b"\x80\x04not a pickle at all"), UsageError, "is not a readable pickle"),
        (write("frame.pickle", raw=_fake_class_pickle("fakepandas.core.frame", "DataFrame", lambda o: o)),
         UsageError, "is a pickled fakepandas.core.frame.DataFrame, not a list or dict"),
    ]
    for path, error, message in cases:
        with pytest.raises(error, match=message) as info:
            original_recipe.read_id_list(path, "stage2_list")
        assert "\n" not in str(info.value) and 'data.stage2_list=""' in str(info.value), path
    assert not marker.exists()
    # a function (lower-case name) of an absent module that the file calls is refused, not recorded
    # PROTO 4, {}, "d1", STACK_GLOBAL evilmod.run_it, (), REDUCE, SETITEM, STOP
    call = b"\x80\x04}\x8c\x02d1\x8c\x07evilmod\x8c\x06run_it\x93)Rs."
    with pytest.raises(UsageError, match="refusing evilmod.run_it: the file calls it"):
        original_recipe.read_id_list(write("call.pickle", raw=call), "eval_list")
    # an object of a class of an absent module is an inert value; the keys are the ids
    ok = write("objects.pickle", raw=_fake_class_pickle("fakepandas.core.series", "Series", lambda o: {"d1": o}))
    assert original_recipe.read_id_list(ok, "stage2_list") == {"d1"}
    text = tmp_path / "ids.txt"
    text.write_text("d1\n\n d2 \n")
    assert original_recipe.read_id_list(str(text), "eval_list") == {"d1", "d2"}


def test_lists_reach_training_and_absent_ids_are_reported(setup, tmp_path, capsys):
    corpus = mimic_cxr.load_corpus(setup["root"], progress=False)
    chosen = sorted(corpus.selected_pa_ap_earliest)[::2]
    with open(tmp_path / "selection.pickle", "wb") as f:
        pickle.dump({i: {"row": i} for i in chosen + ["not-a-real-id"]}, f)
    cfg = _config(setup, "tiny", f"--config.data.stage2_list={tmp_path / 'selection.pickle'}", stage=2)
    sources = lm_data.read_sources(cfg.data)
    assert "data.stage2_list: 1 of its" in capsys.readouterr().err
    assert sources.lists == {"stage2_list": {"listed": len(chosen) + 1, "not_in_corpus": 1,
                                             "not_in_corpus_first": ["not-a-real-id"]}}
    used = {e.dicom_id for e in sources.train["image_text"]} | {e.dicom_id for e in sources.held_out["image_text"]}
    assert used and used <= set(chosen)
    assert {e.dicom_id for e in sources.train["vqa"]} <= set(chosen)
    cfg.data.stage2_list = "{data.root}/missing.pickle"
    with pytest.raises(MissingInputError, match=f"data.stage2_list {setup['root']}/missing.pickle does not exist"):
        lm_data.read_sources(cfg.data)


# ---------------------------------------------------------------- 6. the "_original" variants end to end
def _write_shipped_lists(setup):
    """LLM-CXR's two lists where the "_original" variants look for them (in data.root), holding our selections."""
    corpus = mimic_cxr.load_corpus(setup["root"], progress=False)
    with open(os.path.join(setup["root"], "mimic-cxr-2.0.0-selected-pa-ap-earlist-study.pickle"), "wb") as f:
        pickle.dump({i: None for i in corpus.selected_pa_ap_earliest}, f)
    with open(os.path.join(setup["root"], "eval_dicom_ids.pickle"), "wb") as f:
        pickle.dump([r.dicom_id for r in corpus.evaluation], f)
    return corpus


@pytest.mark.parametrize("stage", [1, 2])
def test_original_variant_batches_follow_llmcxr_recipe(setup, stage):
    corpus = _write_shipped_lists(setup)
    cfg = _config(setup, "tiny_original", stage=stage)
    assert cfg.train.batch_size == 16 and not cfg.data.packing
    sources = lm_data.read_sources(cfg.data)
    assert {e.direction for e in sources.train["image_text"]} == {"cxr_to_report", "report_to_cxr"}
    tok, special, layout = _tokenizer_of(setup)
    pipe = lm_data.make_batches(sources, "train", tok, special, layout, cfg.data, cfg.train.batch_size,
                                shard=grain.sharding.ShardOptions(0, 1))
    sizes = pipe.pool_sizes
    mimic = sizes["cxr_to_report"] + sizes["report_to_cxr"] + sizes["vqa"]
    assert pipe.task_weights["text"] == pytest.approx(0.2)
    assert pipe.task_weights["vqa"] == pytest.approx(0.8 * sizes["vqa"] / mimic)
    assert pipe.epoch_size == int(np.ceil(max(mimic / 0.8, sizes["text"] / 0.2) - 1e-9))
    batch = next(pipe.iterator(num_epochs=1))
    assert batch["input_ids"].shape == (16, cfg.data.seq_len) and batch["example_ids"].shape == (16, 1)
    assert (batch["example_ids"] >= 0).all() and (batch["segment_ids"] <= 1).all()
    held = lm_data.make_batches(sources, "held_out", tok, special, layout, cfg.data, cfg.train.batch_size)
    assert {held.describe(e).dicom_id for e in held.local_example_ids(0)} - {""} <= {
        r.dicom_id for r in corpus.evaluation}


def test_original_variant_trains(setup, tmp_path):
    from llmcxr_jax.train import lm
    from llmcxr_jax.train.metrics import read_metrics

    _write_shipped_lists(setup)
    cfg = _config(setup, "tiny_original", "--config.train.steps=3", "--config.train.log_every=1",
                  "--config.train.eval_every=3", "--config.train.eval_batches=1")
    assert lm.train(cfg, str(tmp_path), echo=False)["step"] == 3
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    assert any(np.isfinite(r.get("eval_loss", np.nan)) for r in records)
