"""The LM trainer's data: a MIMIC-layout corpus + VQ-GAN codes + Dolly rows -> the training and
held-out LmBatches of the configured stage (train split vs validate/test and Dolly's held-out rows),
with our recipe or LLM-CXR's (data.directions, data.mix, data.stage2_list, data.eval_list).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import ml_collections
import numpy as np

from llmcxr_jax.data import codes as code_files
from llmcxr_jax.data import instructions, lm_batches, mimic_cxr, original_recipe
from llmcxr_jax.errors import MissingInputError, UsageError
from llmcxr_jax.vocab import SpecialTokens, VocabLayout

VIEWS = ("all", "frontal")
BATCH_KEYS = ("seq_len", "max_length", "packing", "max_examples_per_row", "loss", "image_delimiters", "mixture",
              "mix", "epoch_size", "seed", "num_workers", "num_threads", "report_instructions", "image_instructions")
# why a code table left an image out, as LLM-CXR's own code check would (its parity numbering skips these)
CODE_CHECK_REASONS = frozenset({"wrong_length", "code_out_of_range", "not_integer_codes"})


@dataclasses.dataclass
class Sources:
    """Plain examples per split (before tokenization) and the image codes."""

    train: dict[str, list]
    held_out: dict[str, list]
    codes: Any
    codebook_size: int
    codes_per_image: int
    lists: dict[str, dict] = dataclasses.field(default_factory=dict)  # given id lists: size, ids not in the corpus


def read_sources(d: ml_collections.ConfigDict) -> Sources:
    """Reads the corpus once; the stage picks records and report text (REFERENCE.md)."""
    if not d.root:
        raise UsageError("data.root is empty; give a MIMIC-CXR-JPG layout root (or make one with `llmcxr synth`)")
    if not d.codes:
        raise UsageError("data.codes is empty; give the output of `llmcxr encode-images` or `llmcxr import-codes`")
    if not os.path.exists(d.codes):
        raise MissingInputError(f"data.codes {d.codes} does not exist; run `llmcxr encode-images` first")
    for key, task in (("report_instructions", "report"), ("image_instructions", "image")):
        instructions.task_instructions(d[key], task, f"data.{key}")  # a bad file fails before the corpus is read
    directions = d.get("directions", "both")
    if directions not in original_recipe.DIRECTIONS:
        raise UsageError(f"data.directions must be one of {original_recipe.DIRECTIONS} (each image both ways, or "
                         f"one way by LLM-CXR's index parity), got {directions!r}")
    lists = {}
    for key in original_recipe.LISTS:  # read (and refused) before the corpus
        path = original_recipe.list_path(d.get(key, ""), d.root)
        lists[key] = original_recipe.read_id_list(path, key) if path else None
    corpus = mimic_cxr.load_corpus(d.root, reports_root=d.reports_root or None, progress=False,
                                   pa_ap_earliest=lists["stage2_list"], evaluation_ids=lists["eval_list"])
    for key, report in corpus.list_report().items():
        if report["not_in_corpus"]:
            print(f"data.{key}: {report['not_in_corpus']} of its {report['listed']} dicom ids are not in "
                  f"{d.root}'s split csv (first: {', '.join(report['not_in_corpus_first'])}); they are left out",
                  file=sys.stderr)
    table = code_files.read_codes(d.codes)
    stage = int(d.stage)
    if stage not in (1, 2):
        raise UsageError(f"data.stage must be 1 or 2, got {stage}")
    views = d.get("views", "all")
    if views not in VIEWS:
        raise UsageError(f"data.views must be one of {VIEWS} (stage-1 images: every view as LLM-CXR, or PA/AP "
                         f"only), got {views!r}")
    train_records = mimic_cxr.stage_records(corpus, stage)
    if views == "frontal":  # stage 2 and evaluation are PA/AP already
        train_records = [r for r in train_records if r.view in mimic_cxr.FRONTAL_VIEWS]
    held_records = mimic_cxr.evaluation_records(corpus)
    vqa = mimic_cxr.read_vqa(d.root).items if os.path.isdir(os.path.join(d.root, "mimic-cxr-jpg_medvqa_v1")) else []
    dolly_path = d.dolly or os.path.join(d.root, "databricks-dolly-15k.jsonl")
    dolly = mimic_cxr.read_dolly(dolly_path).items if os.path.isfile(dolly_path) else []
    order = np.random.default_rng(d.seed).permutation(len(dolly))
    n_eval = min(int(d.dolly_eval_rows), len(dolly) // 2)
    eval_rows = {int(i) for i in order[:n_eval]}
    train_images = lm_batches.image_text_examples(train_records, stage)
    held_images = lm_batches.image_text_examples(held_records, stage)
    if directions == "parity":
        train_images = _one_direction(train_images, corpus, ("train",), table)
        held_images = _one_direction(held_images, corpus, mimic_cxr.EVAL_SPLITS, table)
    return Sources(
        train={"image_text": train_images,
               "vqa": mimic_cxr.vqa_for_records(vqa, mimic_cxr.vqa_image_records(corpus)),
               "text": [row for i, row in enumerate(dolly) if i not in eval_rows]},
        held_out={"image_text": held_images,
                  "vqa": mimic_cxr.vqa_for_records(vqa, mimic_cxr.vqa_image_records(corpus, mimic_cxr.EVAL_SPLITS)),
                  "text": [row for i, row in enumerate(dolly) if i in eval_rows]},
        codes=table, codebook_size=int(table.codebook_size), codes_per_image=int(table.codes_per_image),
        lists=corpus.list_report())


def _one_direction(examples, corpus: mimic_cxr.MimicCxrCorpus, splits, table) -> list:
    """Each example's one task by LLM-CXR's parity over the splits' listed ids; the ids the code table
    rejected as LLM-CXR's check would are not numbered (they have no codes, and LmBatches drops them)."""
    bad = {str(i) for i, reason in table.skipped_items if reason in CODE_CHECK_REASONS}
    bad |= {str(i.get("dicom_id")) for i in table.metadata.get("skipped_items", [])
            if i.get("reason") in CODE_CHECK_REASONS}
    listed = [i for split in splits for i in corpus.split_ids.get(split, ())]
    way = original_recipe.parity_directions(listed, bad)
    return [dataclasses.replace(e, direction=way.get(e.dicom_id, "both")) for e in examples]


def batch_config(d: ml_collections.ConfigDict, batch_size: int, codes_per_image: int, mixture=None) -> dict:
    out = {k: (d[k].to_dict() if isinstance(d[k], ml_collections.ConfigDict) else d[k]) for k in BATCH_KEYS}
    if mixture is not None:
        out["mixture"] = mixture
    out.update(batch_size=batch_size, codes_per_image=codes_per_image)
    return out


def train_iterator(sources: Sources, tokenizer, special: SpecialTokens, layout: VocabLayout,
                   d: ml_collections.ConfigDict, batch_size: int):
    """This process's HostIterator over its block of data.num_shards (0: one per process) and the
    pipelines behind it (for example-id lookups)."""
    import grain
    import jax

    from llmcxr_jax.data import host_shards

    num_shards = int(d.num_shards) or jax.process_count()
    if batch_size % num_shards:
        raise UsageError(f"train.batch_size {batch_size} does not split over data.num_shards {num_shards}")

    def make(index, count):
        return make_batches(sources, "train", tokenizer, special, layout, d, batch_size,
                            shard=grain.sharding.ShardOptions(index, count))

    return host_shards.host_iterator(make, num_shards, jax.process_index(), jax.process_count())


def make_batches(sources: Sources, split: str, tokenizer, special: SpecialTokens, layout: VocabLayout,
                 d: ml_collections.ConfigDict, batch_size: int, shard=None) -> lm_batches.LmBatches:
    """LmBatches over one split. Held-out batches keep the task mix but drop tasks without data."""
    pools = sources.train if split == "train" else sources.held_out
    mixture = None
    if split != "train":
        sizes = {t: sum(e.direction in ("both", t) for e in pools["image_text"]) for t in lm_batches.IMAGE_TASKS}
        sizes.update(vqa=len(pools["vqa"]), text=len(pools["text"]))
        mixture = {k: (float(w) if sizes[k] else 0.0) for k, w in d.mixture.items()}
    cfg = batch_config(d, batch_size, sources.codes_per_image, mixture)
    return lm_batches.LmBatches(tokenizer, special, layout, image_text=pools["image_text"], vqa=pools["vqa"],
                                text=pools["text"], codes=sources.codes, config=cfg, shard=shard)
