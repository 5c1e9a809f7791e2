"""LM training batches as a grain pipeline: epoch plan -> prompt -> token ids -> packed rows (packing.py).
Owns the per-epoch example plan (task mixture, paraphrase choice, shuffle, per-process shard), LLM-CXR's filters
(bad image codes, too-long examples) and the pipeline whose iterator the trainer checkpoints as item "data_iter".
"""
from __future__ import annotations

import collections
import dataclasses
import math
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import grain
import numpy as np

from llmcxr_jax.data import original_recipe, packing, prompts
from llmcxr_jax.data.instructions import task_instructions
from llmcxr_jax.errors import UsageError
from llmcxr_jax.vocab import SpecialTokens, VocabLayout

TASKS = ("cxr_to_report", "report_to_cxr", "vqa", "text")
IMAGE_TASKS = TASKS[:2]
EXAMPLE_DIRECTIONS = ("both", *IMAGE_TASKS)  # an ImageTextExample's use: both tasks, or one (data.directions=parity)
# Paper mix: CXR->report 30%, report->CXR 30%, VQA 20%, text instructions 20%.
STAGE1_MIXTURE = {"cxr_to_report": 0.3, "report_to_cxr": 0.3, "vqa": 0.2, "text": 0.2}
# Stage 2 keeps the mix; the caller passes stage-2 records (PA/AP, earliest study, impression).
STAGE2_MIXTURE = dict(STAGE1_MIXTURE)
DEFAULT_MIXTURES = {1: STAGE1_MIXTURE, 2: STAGE2_MIXTURE}
_MAX_EXAMPLE_ID = 2**31 - 1  # example ids travel as int32


# ---------------------------------------------------------------- inputs
# VQA items are taken duck-typed (dicom_id, question, answer), e.g. text_corpora.VqaExample or dicts.
@dataclasses.dataclass(frozen=True)
class ImageTextExample:
    dicom_id: str
    report: str  # the stage's text (stage 1 findings + impression, stage 2 impression)
    direction: str = "both"  # one of EXAMPLE_DIRECTIONS ("" = both)


@dataclasses.dataclass(frozen=True)
class TextExample:
    instruction: str
    context: str
    response: str


@dataclasses.dataclass(frozen=True)
class _Vqa:
    dicom_id: str
    question: str
    answer: str


def image_text_examples(records: Iterable[Any], stage: int) -> list[ImageTextExample]:
    """CxrRecord-like objects -> examples with mimic_cxr.stage_text (records without it are counted later)."""
    from llmcxr_jax.data.mimic_cxr import stage_text

    return [ImageTextExample(r.dicom_id, stage_text(r, stage) or "") for r in records]


def _as(cls, item):
    """A dataclass, dict (Dolly jsonl row) or any object with the fields -> cls; None becomes ""."""
    if isinstance(item, cls):
        return item
    get = item.get if isinstance(item, Mapping) else (lambda k, d=None: getattr(item, k, d))
    return cls(**{f.name: get(f.name, "") or "" for f in dataclasses.fields(cls)})


# ---------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class BatchConfig:
    seq_len: int = 2048  # row length
    max_length: int = 2048  # drop examples with >= max_length tokens (LLM-CXR's filter); <= seq_len
    batch_size: int = 16  # global rows per step, split evenly over processes
    packing: bool = True  # first-fit several examples per row; False: one example per row
    max_examples_per_row: int = 16  # width of example_ids when packing
    loss: str = "response"  # "response" (LLM-CXR) or "joint" (every token)
    image_delimiters: str = "text"  # "text" (LLM-CXR "<" image ">") or "special" (<|image|> ... <|/image|>)
    mixture: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(STAGE1_MIXTURE))
    mix: str = "fixed"  # "fixed": mixture's weights; "original": LLM-CXR's interleave over the tasks mixture keeps
    epoch_size: int = 0  # examples per epoch; 0: smallest size that visits every pool at least once
    seed: int = 42  # LLM-CXR's DEFAULT_SEED
    codes_per_image: int = 256  # h*w of the VQ-GAN latent
    report_instructions: str = ""  # CXR->report instruction file (instructions.py formats); "" = ours
    image_instructions: str = ""  # report->CXR instruction file; "" = ours (prompts.IMAGE_INSTRUCTIONS)
    num_threads: int = 0  # grain read threads per process
    num_workers: int = 0  # grain worker processes tokenizing examples
    worker_buffer_size: int = 2

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> BatchConfig:
        d = dict(d.to_dict() if hasattr(d, "to_dict") else (d or {}))
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UsageError(f"unknown LM data config keys {sorted(unknown)}")
        return cls(**d)

    def __post_init__(self):
        if not 0 < self.max_length <= self.seq_len:
            raise UsageError(f"need 0 < max_length <= seq_len, got max_length {self.max_length}, "
                             f"seq_len {self.seq_len}")
        if self.loss not in ("response", "joint"):
            raise UsageError(f"loss must be 'response' or 'joint', got {self.loss!r}")
        if self.image_delimiters not in ("text", "special"):
            raise UsageError(f"image_delimiters must be 'text' or 'special', got {self.image_delimiters!r}")
        if self.max_examples_per_row < 1 or self.batch_size < 1 or self.codes_per_image < 1:
            raise UsageError("batch_size, max_examples_per_row and codes_per_image must be >= 1")
        if self.mix not in original_recipe.MIXES:
            raise UsageError(f"mix must be one of {original_recipe.MIXES} (our fixed mixture, or LLM-CXR's MIMIC "
                             f"0.8 / Dolly 0.2 interleave), got {self.mix!r}")
        bad = set(self.mixture) - set(TASKS)
        if bad or any(float(w) < 0 for w in self.mixture.values()) or sum(map(float, self.mixture.values())) <= 0:
            raise UsageError(f"mixture must map tasks {TASKS} to weights >= 0 with a positive sum, "
                             f"got {dict(self.mixture)}")

    @property
    def weights(self) -> np.ndarray:
        w = np.array([float(self.mixture.get(t, 0.0)) for t in TASKS])
        return w / w.sum()

    def task_weights(self, sizes) -> np.ndarray:
        """Sampling weight per task given its pool size: the mixture, or with mix "original" LLM-CXR's
        interleave (MIMIC tasks share 0.8 by pool size, text 0.2) over the tasks the mixture keeps (> 0)."""
        if self.mix == "fixed":
            return self.weights
        kept = {t: n for t, n, w in zip(TASKS, sizes, self.weights) if w > 0}
        w = original_recipe.interleave_weights(kept)
        return np.array([w.get(t, 0.0) for t in TASKS])


@dataclasses.dataclass(frozen=True)
class ExampleRef:
    """What an example id points at, for error messages and evaluation."""

    task: str
    dicom_id: str  # "" for text instructions
    source_index: int  # index into the validated pool: pools["image_text"] for both image tasks, else the task's


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """The global example list of one epoch (identical on every process), already shuffled."""

    epoch: int
    task: np.ndarray  # [N] int8, index into TASKS
    source: np.ndarray  # [N] int32, index into the task's pool
    paraphrase: np.ndarray  # [N] int16, instruction choice for the image tasks


# ---------------------------------------------------------------- plan
class _Planner:
    """Deterministic epoch plans from (seed, epoch): exact per-task counts, shuffled as a whole.

    A task's k-th slot over all epochs takes its pool in cycles, each cycle a fresh permutation,
    so within a cycle no pool item repeats and smaller pools are revisited (like LLM-CXR's
    all_exhausted interleave of MIMIC and Dolly).
    """

    def __init__(self, pool_sizes, weights, paraphrases, epoch_size, shard_count, seed):
        self.pool_sizes, self.seed = np.asarray(pool_sizes), int(seed)
        self.paraphrases = np.asarray(paraphrases)
        live = weights > 0
        n = epoch_size or max(math.ceil(p / w - 1e-9) for p, w in zip(self.pool_sizes[live], weights[live]))
        self.size = -(-max(n, 1) // shard_count) * shard_count  # every process gets the same count
        raw = weights * self.size
        counts = np.floor(raw + 1e-9).astype(np.int64)
        counts[np.argsort(-(raw - counts), kind="stable")[:self.size - counts.sum()]] += 1
        self.counts = counts
        self._cache: dict[int, EpochPlan] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_cache", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state, _cache={}, _lock=threading.Lock())

    def plan(self, epoch: int) -> EpochPlan:
        with self._lock:
            if epoch not in self._cache:
                if len(self._cache) >= 2:
                    self._cache.pop(min(self._cache))
                self._cache[epoch] = self._make(epoch)
            return self._cache[epoch]

    def _make(self, epoch: int) -> EpochPlan:
        task = np.repeat(np.arange(len(TASKS)), self.counts)
        source = np.concatenate([self._stream(t, epoch * c, c) for t, c in enumerate(self.counts)])
        u = np.random.default_rng([self.seed, 2, epoch]).random(self.size)
        para = (u * self.paraphrases[task]).astype(np.int16)
        perm = np.random.default_rng([self.seed, 0, epoch]).permutation(self.size)
        return EpochPlan(epoch, task[perm].astype(np.int8), source[perm].astype(np.int32), para[perm])

    def _stream(self, task: int, start: int, count: int) -> np.ndarray:
        m = np.arange(start, start + count, dtype=np.int64)
        out = np.zeros(count, np.int64)
        if not count:
            return out
        size = int(self.pool_sizes[task])
        cycles = m // size
        for c in np.unique(cycles):
            sel = cycles == c
            out[sel] = np.random.default_rng([self.seed, 1, task, int(c)]).permutation(size)[m[sel] % size]
        return out


# ---------------------------------------------------------------- example maker (runs in grain workers)
class _ExampleMaker:
    """Local index -> one tokenized example (or a drop marker for a too-long one)."""

    def __init__(self, planner, shard_index, shard_count, pools, task_items, codes, encoder, instructions,
                 cfg: BatchConfig):
        self.planner, self.shard_index, self.shard_count = planner, shard_index, shard_count
        self.per_shard = planner.size // shard_count
        self.pools, self.codes, self.encoder, self.instructions, self.cfg = pools, codes, encoder, instructions, cfg
        self.task_items = task_items  # image task -> indices into pools["image_text"] of its examples

    def pool_index(self, name: str, src: int) -> tuple[str, int]:
        """A plan's (task, source) -> (pool name, index into that pool)."""
        if name in IMAGE_TASKS:
            return "image_text", int(self.task_items[name][src])
        return name, src

    def global_index(self, j: int) -> tuple[int, int]:
        epoch, r = divmod(int(j), self.per_shard)
        return epoch, r * self.shard_count + self.shard_index

    def __call__(self, j: int) -> dict[str, Any]:
        epoch, i = self.global_index(j)
        plan = self.planner.plan(epoch)
        task, src, para = int(plan.task[i]), int(plan.source[i]), int(plan.paraphrase[i])
        text, codes = self.render(task, src, para)
        ids = self.encoder.encode(text, codes)
        dropped = len(ids) >= self.cfg.max_length  # LLM-CXR keeps only len(input_ids) < max_length
        out = {"example_id": epoch * self.planner.size + i, "task": task, "dropped": int(dropped)}
        if dropped:
            ids = ids[:0]
        ex = self.encoder.example(ids, self.cfg.loss) if len(ids) else None
        for k in packing.EXAMPLE_KEYS:
            out[k] = getattr(ex, k) if ex is not None else np.zeros(0, packing.BATCH_SPEC[k])
        return out

    def render(self, task: int, src: int, para: int) -> tuple[str, np.ndarray | None]:
        name, ph = TASKS[task], prompts.IMAGE_MARKER
        pool, index = self.pool_index(name, src)
        if name == "text":
            ex = self.pools["text"][index]
            return prompts.format_prompt(ex.instruction, ex.response, ex.context or None), None
        ex, row = self.pools[pool][index]
        codes = self.codes[row]
        if name == "cxr_to_report":
            return prompts.format_prompt(self.instructions[0][para], ex.report, ph), codes
        if name == "report_to_cxr":
            return prompts.format_prompt(self.instructions[1][para], ph, ex.report), codes
        return prompts.format_prompt(ex.question, ex.answer, ph), codes


# ---------------------------------------------------------------- public pipeline
class LmBatches:
    """Everything the LM trainer reads: batches, epoch plans, example-id lookup, filter counts.

    Inputs are plain values: image_text (ImageTextExample; its direction puts it in both image tasks'
    pools or one), vqa (objects or dicts with dicom_id, question, answer, e.g. text_corpora.VqaExample),
    text (TextExample or Dolly dicts), codes {dicom_id: uint16 [codes_per_image]}. shard defaults to one
    shard per JAX process (grain.sharding.ShardByJaxProcess). pool_sizes and task_weights: per task, what
    the epoch plan draws from and by.
    """

    def __init__(self, tokenizer, special: SpecialTokens, layout: VocabLayout, *, image_text=(), vqa=(), text=(),
                 codes: Mapping[str, Any] | None = None, config: BatchConfig | Mapping | None = None,
                 shard: grain.sharding.ShardOptions | None = None):
        cfg = config if isinstance(config, BatchConfig) else BatchConfig.from_dict(config)
        shard = shard or grain.sharding.ShardByJaxProcess(drop_remainder=True)
        if cfg.batch_size % shard.shard_count:
            raise UsageError(f"batch_size {cfg.batch_size} does not split over {shard.shard_count} processes")
        self.config, self.layout, self.special = cfg, layout, special
        self.shard_index, self.shard_count = int(shard.shard_index), int(shard.shard_count)
        self.encoder = prompts.PromptTokenizer(tokenizer, layout, special, cfg.image_delimiters)
        instructions = (task_instructions(cfg.report_instructions, "report", "data.report_instructions"),
                        task_instructions(cfg.image_instructions, "image", "data.image_instructions"))
        self.skipped: collections.Counter = collections.Counter()  # (source, reason) -> count
        self.pools, code_rows = self._validate(image_text, vqa, text, codes or {})
        directions = [ex.direction for ex, _ in self.pools["image_text"]]
        task_items = {t: np.array([i for i, d in enumerate(directions) if d in ("both", t)], np.int64)
                      for t in IMAGE_TASKS}
        sizes = [len(task_items[t]) for t in IMAGE_TASKS] + [len(self.pools["vqa"]), len(self.pools["text"])]
        for t, w, n in zip(TASKS, cfg.weights, sizes):
            if w > 0 and n == 0:
                raise UsageError(f"task {t} has mixture weight {w:.2f} but no usable examples "
                                 f"(skipped: {dict(self.skipped)}); give its data or set mixture.{t}=0")
        self.pool_sizes = dict(zip(TASKS, sizes))
        self.task_weights = dict(zip(TASKS, cfg.task_weights(sizes).tolist()))  # what the plan draws by
        self.planner = _Planner(sizes, np.array(list(self.task_weights.values())),
                                [len(instructions[0]), len(instructions[1]), 1, 1],
                                cfg.epoch_size, self.shard_count, cfg.seed)
        self._maker = _ExampleMaker(self.planner, self.shard_index, self.shard_count, self.pools, task_items,
                                    code_rows, self.encoder, instructions, cfg)

    def _validate(self, image_text, vqa, text, codes):
        """Drop (and count) examples LLM-CXR cannot train on; returns pools and a code matrix."""
        cfg, rows, matrix = self.config, {}, []

        def code_row(source, dicom_id):
            if dicom_id not in rows:
                c = codes.get(dicom_id) if hasattr(codes, "get") else None
                c = None if c is None else np.asarray(c)
                if c is None:
                    rows[dicom_id] = "missing codes"
                elif c.ndim != 1 or c.shape[0] != cfg.codes_per_image:
                    rows[dicom_id] = "wrong code length"
                elif c.size and (c.min() < 0 or c.max() >= self.layout.image_codes):
                    rows[dicom_id] = "code outside codebook"
                else:
                    rows[dicom_id] = len(matrix)
                    matrix.append(c.astype(np.uint16))
            if isinstance(rows[dicom_id], str):
                self.skipped[(source, rows[dicom_id])] += 1
                return None
            return rows[dicom_id]

        def has_marker(*texts):  # a second "<image>" would make the injection ambiguous
            markers = (prompts.IMAGE_MARKER, prompts.IMAGE_BEGIN, prompts.IMAGE_END)
            return any(m in t for t in texts for m in markers)

        pools = {"image_text": [], "vqa": [], "text": []}
        for ex in map(lambda x: _as(ImageTextExample, x), image_text):
            if ex.direction not in EXAMPLE_DIRECTIONS:
                if ex.direction:
                    raise UsageError(f"image_text example {ex.dicom_id} has direction {ex.direction!r}; "
                                     f"use one of {EXAMPLE_DIRECTIONS}")
                ex = dataclasses.replace(ex, direction="both")
            if not ex.report.strip():
                self.skipped[("image_text", "empty report")] += 1
            elif has_marker(ex.report):
                self.skipped[("image_text", "text contains an image marker")] += 1
            elif (row := code_row("image_text", ex.dicom_id)) is not None:
                pools["image_text"].append((ex, row))
        for ex in map(lambda x: _as(_Vqa, x), vqa):
            if not (ex.question.strip() and ex.answer.strip()):
                self.skipped[("vqa", "empty question or answer")] += 1
            elif has_marker(ex.question, ex.answer):
                self.skipped[("vqa", "text contains an image marker")] += 1
            elif (row := code_row("vqa", ex.dicom_id)) is not None:
                pools["vqa"].append((ex, row))
        for ex in map(lambda x: _as(TextExample, x), text):
            if ex.instruction.strip() and ex.response.strip():
                pools["text"].append(ex)
            else:
                self.skipped[("text", "empty instruction or response")] += 1
        shape = (len(matrix), cfg.codes_per_image)
        return pools, (np.stack(matrix) if matrix else np.zeros(shape, np.uint16))

    # ---- epoch view
    @property
    def epoch_size(self) -> int:
        """Global examples per epoch (a multiple of the process count)."""
        return self.planner.size

    @property
    def rows_per_batch(self) -> int:
        return self.config.batch_size // self.shard_count

    @property
    def examples_per_row(self) -> int:
        return self.config.max_examples_per_row if self.config.packing else 1

    def epoch_plan(self, epoch: int) -> EpochPlan:
        return self.planner.plan(epoch)

    def local_example_ids(self, epoch: int) -> np.ndarray:
        """Example ids this process reads in an epoch, in order (before length filtering)."""
        n = self.epoch_size
        return epoch * n + np.arange(self.shard_index, n, self.shard_count, dtype=np.int64)

    def describe(self, example_id: int) -> ExampleRef:
        epoch, i = divmod(int(example_id), self.epoch_size)
        plan = self.planner.plan(epoch)
        task = TASKS[int(plan.task[i])]
        pool, index = self._maker.pool_index(task, int(plan.source[i]))
        if task == "text":
            return ExampleRef(task, "", index)
        ex, _ = self.pools[pool][index]
        return ExampleRef(task, ex.dicom_id, index)

    def example(self, example_id: int) -> tuple[str, np.ndarray | None]:
        """Prompt text and image codes of an example id (for inspection and tests)."""
        epoch, i = divmod(int(example_id), self.epoch_size)
        plan = self.planner.plan(epoch)
        return self._maker.render(int(plan.task[i]), int(plan.source[i]), int(plan.paraphrase[i]))

    # ---- grain pipeline
    def dataset(self, num_epochs: int | None = None) -> grain.IterDataset:
        """Batches of this process's shard; num_epochs None repeats until example ids would overflow int32."""
        cfg, per_shard = self.config, self.epoch_size // self.shard_count
        max_epochs = (_MAX_EXAMPLE_ID + 1) // self.epoch_size
        if num_epochs is not None and not 0 < num_epochs <= max_epochs:
            raise UsageError(f"num_epochs must be in 1..{max_epochs} for an epoch of {self.epoch_size} examples")
        ds = grain.MapDataset.range(per_shard * (num_epochs or max_epochs)).map(self._maker)
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads))
        if cfg.num_workers > 0:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers,
                                                             per_worker_buffer_size=cfg.worker_buffer_size))
        return packing.PackedRows(ds, rows=self.rows_per_batch, seq_len=cfg.seq_len, per_row=self.examples_per_row,
                                  pad_id=self.special.pad_id, task_names=TASKS)

    def iterator(self, num_epochs: int | None = None) -> packing.PackedRowsIterator:
        """A checkpointable iterator: get_state()/set_state(), or orbax via checkpoint_args();
        its .dropped counts too-long examples per task."""
        return iter(self.dataset(num_epochs))


def checkpoint_args(iterator: grain.DatasetIterator, restore: bool = False):
    """Orbax args for the "data_iter" item: grain's CheckpointHandler writes one JSON state per process.

    Save: ocp.args.Composite(state=..., data_iter=checkpoint_args(it)); restore with restore=True
    into a fresh iterator from the same pipeline.
    """
    cls = grain.checkpoint.CheckpointRestore if restore else grain.checkpoint.CheckpointSave
    return cls(iterator)

