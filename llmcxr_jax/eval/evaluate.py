"""`llmcxr evaluate`: score a trained LLM-CXR the way the paper does, on the evaluation images of a
MIMIC-CXR-JPG layout root (validate + test, PA/AP of each subject's earliest study, impression
present; `mimic_cxr.evaluation_records`).

- CXR->report: a report per image (LLM-CXR sampling: top_p 0.92, or greedy), CheXpert labels of
  reference and generated text (the rule-based labeler, or CSVs written by the official CheXpert
  labeler / CheXbert over reports.csv), label F1/Jaccard/AUROC and BLEU/METEOR/ROUGE-L/CIDEr-D.
- report->CXR: an image per reference report (exactly h*w codes: constrained, or LLM-CXR's
  sample-and-retry, where an input out of retries is left out of the scores), scored by CXR
  classifiers (AUROC / F1 of their outputs on generated images against the reference report's
  labels, beside the same on the real images and on their VQ-GAN reconstructions, the ceiling for
  an LM that draws in the VQ-GAN's codes): ours (--classifier) and torchxrayvision's, the paper's
  (--txv-weights holding the whole classifier); FID on our classifier's features, on the
  torchxrayvision DenseNet's (--txv-weights) and on the FID Inception's (--inception-weights).
- CXR-VQA: answers to the VQA questions of those images, scored by question type.
- VQ-GAN: PSNR / SSIM of the reconstructions of the real evaluation images.
Chance baselines (a random report with the reference prevalence, a constant classifier, the most
frequent VQA answer per type) are written beside every number. protocol="paper" (eval/protocol.py)
runs LLM-CXR's evaluation and states in metrics.md what ran, what departs and what is missing.

Outputs in OUT: metrics.json, metrics.md, reports.csv (dicom_id, reference, generated, instruction)
plus generated_reports.csv / reference_reports.csv (one report per line, the CheXpert labeler's input),
images/*.png (generated CXRs) and images.csv (dicom_id, instruction, image, retries), grid_*.png
(real over generated, captioned), vqa.jsonl. The token ids behind each row (prompt_ids, generated_ids,
image_codes, as generate's results.jsonl) are in reports.jsonl and images.jsonl (dicom_id first, rows
in the order of the CSV) and in every vqa.jsonl row. tensorboard/: metrics, grids and sample reports at the
checkpoint's step (eval/board.py).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from llmcxr_jax.data import images as image_io
from llmcxr_jax.data import instructions, mimic_cxr, original_recipe, text_corpora
from llmcxr_jax.errors import UsageError
from llmcxr_jax.eval import board as eval_board
from llmcxr_jax.eval import image_metrics, labeler, protocol, report_card, vqa_metrics
from llmcxr_jax.eval.image_scores import ImageNetworks, score_images
from llmcxr_jax.eval.image_scores import gray as gray  # demo/pipeline.py imports it from here
from llmcxr_jax.eval.report_metrics import bootstrap_interval, check_tokenizer, label_metrics, text_metrics
from llmcxr_jax.eval.scores import chance_label_metrics, most_frequent_answers
from llmcxr_jax.infer import tasks
from llmcxr_jax.infer.sampling import LLMCXR_TEMPERATURE, LLMCXR_TOP_K, LLMCXR_TOP_P
from llmcxr_jax.infer.tasks import MAX_RETRIES
from llmcxr_jax.train.tensorboard import Board

TASKS = ("report", "image", "vqa")


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    tasks: tuple[str, ...] = TASKS
    max_images: int = 0              # 0: every evaluation image
    max_vqa: int = 0                 # 0: every question of those images
    batch_size: int = 16
    greedy: bool = False             # LLM-CXR samples (top_p 0.92); greedy is reproducible across libraries
    temperature: float = LLMCXR_TEMPERATURE  # when sampling (default: LLM-CXR's)
    image_temperature: float | None = None   # report->CXR drawing; None: `temperature`
    top_p: float = LLMCXR_TOP_P              # 1.0: off
    top_k: int = LLMCXR_TOP_K                # 0: off
    max_new_tokens: int = 0          # reports and answers; 0: LLM-CXR's 128
    seed: int = 0
    report_part: str = "impression"  # reference text: "impression" (stage 2) or "findings+impression"
    classifier: str = ""             # directory from cxr_classifier.save_classifier
    txv_weights: str = ""            # `llmcxr convert-weights txv` output: FID on its features; with --classifier
    #                                  the whole torchxrayvision classifier, whose AUROC / F1 the paper reports
    inception_weights: str = ""      # torch-fidelity's FID Inception weights file: FID on Inception features
    protocol: str = ""               # "paper": LLM-CXR's evaluation (eval/protocol.py); "": the options as given
    require_all_metrics: bool = False  # with protocol "paper": fail up front when a paper metric cannot be computed
    meteor: bool = False             # METEOR too (Java, ~10 s; protocol "paper" turns it on); without Java: stated
    reference_labels: str = ""       # CheXpert labeler / CheXbert CSV over reference_reports.csv
    generated_labels: str = ""       # ... over generated_reports.csv
    grid_images: int = 8
    reports_root: str | None = None
    eval_list: str = ""             # LLM-CXR's eval_dicom_ids.pickle (or a .txt of ids): these images, not ours
    ci_samples: int = 1000           # bootstrap resamples for intervals (per finding, headline scores); 0: none
    text_tokenizer: str = "ptb"      # feeds BLEU / ROUGE-L / CIDEr-D: pycocoevalcap's PTB (Java) or "simple"
    # CXR->report / report->CXR instructions: () = our first paraphrase for every image; otherwise one
    # is drawn per image from (seed, task), the same for a seed whatever batch_size or max_images
    report_instructions: tuple[str, ...] = ()
    image_instructions: tuple[str, ...] = ()
    image_decoding: str = "constrained"  # or "retry": LLM-CXR's sample until h*w codes (tasks.IMAGE_DECODINGS)
    max_retries: int = MAX_RETRIES   # retry decoding: retries before an image counts as failed
    dtype: str = "float32"           # the LM's compute dtype; "bfloat16" as LLM-CXR generated
    clean_up_spaces: bool = True     # reports and answers lose spaces before . , ! ? 's n't ... (transformers')
    allow_image_tokens_in_text: bool = False  # True: reports and answers may sample image ids (as LLM-CXR)
    stop_at_end_key_only: bool = False        # True: eos does not end a report or answer (as LLM-CXR)
    keep_special_tokens: bool = False         # True: special tokens inside a response stay in its text (as LLM-CXR)

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise UsageError(f"unknown evaluation task(s) {unknown or '(none given)'}; choose from {TASKS}")
        if self.report_part not in ("impression", "findings+impression"):
            raise UsageError(f"report_part must be 'impression' or 'findings+impression', got {self.report_part!r}")
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {self.batch_size}")
        for name, zero in (("max_images", "every image"), ("max_vqa", "every question"),
                           ("max_new_tokens", "LLM-CXR's 128"), ("grid_images", "no grids"),
                           ("ci_samples", "no intervals")):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be >= 0 (0: {zero}), got {getattr(self, name)}")
        tasks.check_sampling(self.greedy, self.temperature, self.top_p, self.top_k)
        tasks.check_decoding(self.image_decoding, self.max_retries, self.dtype)
        if self.text_tokenizer not in ("ptb", "simple"):
            raise UsageError(f"text_tokenizer must be 'ptb' or 'simple', got {self.text_tokenizer!r}")
        for name in ("report_instructions", "image_instructions"):
            given = getattr(self, name)
            if isinstance(given, str):
                raise UsageError(f"{name} is a string; give a tuple of instructions (one string: ({given[:40]!r},))")
            object.__setattr__(self, name, tuple(instructions.check_instruction(s, f"{name}[{i}]")
                                                 for i, s in enumerate(given)))
        if self.image_temperature is not None and not self.image_temperature > 0.0:
            raise UsageError(f"image_temperature must be > 0 (or unset: the report temperature), "
                             f"got {self.image_temperature}")
        if self.protocol not in protocol.PROTOCOLS:
            raise UsageError(f"protocol must be 'paper' or '' (the options as given), got {self.protocol!r}")
        if self.protocol == "paper":
            protocol.check_paper(self)
            object.__setattr__(self, "meteor", True)
        elif self.require_all_metrics:
            raise UsageError("--require-all-metrics applies with --protocol paper")


def task_sampling(o: EvalOptions, task: str, codes_per_image: int):
    """The decoding settings of one task: max_new_tokens caps reports and answers (images take their
    span), and drawings sample at image_temperature when it is set."""
    limit = o.max_new_tokens if task != "image" and o.max_new_tokens else None
    temperature = o.image_temperature if task == "image" and o.image_temperature is not None else o.temperature
    return tasks.default_sampling(task, o.greedy, limit, codes_per_image, temperature, o.top_p, o.top_k,
                                  o.image_decoding)


def _reference_text(record: mimic_cxr.CxrRecord, part: str) -> str:
    return mimic_cxr.stage_text(record, 2 if part == "impression" else 1) or ""


def _batches(n: int, size: int, desc: str, progress: bool):
    with tqdm(total=n, desc=desc, unit="item", file=sys.stderr, disable=not progress, mininterval=2.0) as bar:
        for start in range(0, n, size):
            yield start, slice(start, min(n, start + size))
            bar.update(min(n, start + size) - start)


def _labels(texts: Sequence[str], csv_path: str, what: str) -> np.ndarray:
    """Labels of `texts`: the rule-based labeler, or the rows of a labeler CSV matched by report text."""
    if not csv_path:
        return labeler.label_reports(texts)
    reports, rows = labeler.read_label_csv(csv_path)
    by_text = {" ".join(r.split()): row for r, row in zip(reports, rows)}
    missing = [t for t in texts if " ".join(t.split()) not in by_text]
    if missing:
        raise UsageError(f"{csv_path} has no row for {len(missing)} {what} report(s), e.g. {missing[0][:60]!r}; "
                         f"label {what}_reports.csv from this evaluation's output")
    return np.stack([by_text[" ".join(t.split())] for t in texts])


class Evaluation:
    """One evaluation run: the generator, the selected records and what each task produced."""

    def __init__(self, generator: tasks.Generator, records: Sequence[mimic_cxr.CxrRecord], out: str,
                 opts: EvalOptions, progress: bool = True, networks: ImageNetworks | None = None,
                 board: Board | None = None):
        self.g, self.records, self.out, self.opts, self.progress = generator, list(records), out, opts, progress
        self.board = board  # TensorBoard samples at the checkpoint's step (eval/board.py); None: none
        self.networks = networks or ImageNetworks()
        self.references = [_reference_text(r, opts.report_part) for r in self.records]
        self.instructions = {task: instructions.sample(given, len(self.records), opts.seed, task) if given else
                             [tasks.DEFAULT_INSTRUCTION[task]] * len(self.records)
                             for task, given in (("report", opts.report_instructions),
                                                 ("image", opts.image_instructions))}
        self.reference_labels = _labels(self.references, opts.reference_labels, "reference")
        self.metrics: dict = {"n_images": len(self.records), "baselines": {}}
        self._real: np.ndarray | None = None
        self._recon: np.ndarray | None = None

    def _sampling(self, task: str):
        return task_sampling(self.opts, task, self.g.codes_per_image)

    def reports(self) -> list[str]:
        paths = [r.image_path for r in self.records]
        generated: list[str] = []
        ids: list[dict] = []
        sampling = self._sampling("report")
        for b, sl in _batches(len(paths), self.opts.batch_size, "CXR->report", self.progress):
            made = self.g.report_results(paths[sl], sampling, self.opts.seed + b, self.instructions["report"][sl])
            generated += made.texts
            ids += [made.ids(i) for i in range(len(made.texts))]
        self._write_reports(generated)
        if self.board is not None:
            eval_board.log_reports(self.board, self.g.lm.step, [r.dicom_id for r in self.records], self.references,
                                   generated)
        _write_ids(os.path.join(self.out, "reports.jsonl"), [r.dicom_id for r in self.records], ids)
        gen_labels = _labels(generated, self.opts.generated_labels, "generated")
        self.metrics["report"] = {"labels": label_metrics(self.reference_labels, gen_labels,
                                                            ci_samples=self.opts.ci_samples),
                                  "text": text_metrics(generated, self.references, tokenizer=self.opts.text_tokenizer,
                                                       meteor=self.opts.meteor, ci_samples=self.opts.ci_samples)}
        if "meteor_not_computed" in self.metrics["report"]["text"]:
            print(f"evaluate: METEOR not computed: {self.metrics['report']['text']['meteor_not_computed']}",
                  file=sys.stderr)
        self.metrics["baselines"]["report"] = {"labels": chance_label_metrics(self.reference_labels)}
        return generated

    def _write_reports(self, generated: Sequence[str]) -> None:
        with open(os.path.join(self.out, "reports.csv"), "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["dicom_id", "reference", "generated", "instruction"])
            w.writerows([r.dicom_id, ref, gen, ins] for r, ref, gen, ins in
                        zip(self.records, self.references, generated, self.instructions["report"]))
        for name, texts in (("generated_reports.csv", generated), ("reference_reports.csv", self.references)):
            with open(os.path.join(self.out, name), "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows([" ".join(t.split())] for t in texts)

    def images(self) -> np.ndarray:
        """report->CXR for every record; PNGs in OUT/images, grids, classifier and FID scores over the
        images made (with retry decoding, an input out of retries has none and is left out)."""
        o, sampling = self.opts, self._sampling("image")
        drawn = [self.g.image(self.references[sl], sampling, o.seed + b, self.instructions["image"][sl],
                              o.image_decoding, o.max_retries)
                 for b, sl in _batches(len(self.records), o.batch_size, "report->CXR", self.progress)]
        ok, retries = np.concatenate([d.ok for d in drawn]), np.concatenate([d.retries for d in drawn])
        fake = np.concatenate([d.images for d in drawn])[ok]
        ids = [r.dicom_id for r in self.records]
        os.makedirs(os.path.join(self.out, "images"), exist_ok=True)
        pngs = [os.path.join("images", f"{i}.png") if made else "" for i, made in zip(ids, ok)]
        for img, png in zip(fake, (p for p in pngs if p)):
            image_io.save_image(img, os.path.join(self.out, png))
        with open(os.path.join(self.out, "images.csv"), "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([["dicom_id", "instruction", "image", "retries"],
                                     *zip(ids, self.instructions["image"], pngs, retries.tolist())])
        _write_ids(os.path.join(self.out, "images.jsonl"), ids, [d.ids(i) for d in drawn for i in range(len(d.ok))])
        scores: dict = {"n": len(fake), "decoding": o.image_decoding}
        if o.image_decoding == "retry":
            failed = [i for i, made in zip(ids, ok) if not made]
            scores |= {"max_retries": o.max_retries, "retries_total": int(retries.sum()),
                       "retries_per_image": dict(zip(ids, retries.tolist())), "failed": failed}
            if failed:
                tries = f"{o.max_retries + 1} tries" if o.max_retries else "1 try"
                print(f"report->CXR: {len(failed)} of {len(ids)} reports got no image of exactly "
                      f"{self.g.codes_per_image} image tokens in {tries}; metrics.json's image.failed lists "
                      "them and the image scores leave them out", file=sys.stderr)
        self.metrics["image"] = scores
        if not ok.any():
            return fake
        real, labels, refs = self.real_images()[ok], self.reference_labels[ok], np.asarray(self.references)[ok]
        self._grids(real, fake, list(refs))
        if self.board is not None:
            eval_board.log_images(self.board, self.g.lm.step, real, fake, o.grid_images)
        made, chance = score_images(self.networks, real, fake, lambda: self.reconstructions()[ok], labels,
                                    o.ci_samples, self.progress)
        scores |= made
        if chance:
            self.metrics["baselines"]["image"] = chance
        return fake

    def _grids(self, real: np.ndarray, fake: np.ndarray, captions: list[str]) -> None:
        k = self.opts.grid_images
        if k == 0:  # no grids asked for
            return
        for g, start in enumerate(range(0, min(len(real), 2 * k), k)):  # at most two grids
            sl = slice(start, min(len(real), start + k))
            report_card.write_grid(os.path.join(self.out, f"grid_{g}.png"), real[sl], fake[sl], captions[sl])

    def real_images(self) -> np.ndarray:
        """The evaluation images at the VQ-GAN's input size, [n, H, W, C] in [-1, 1]; read once."""
        if self._real is None:
            cfg = self.g.vqgan.cfg
            self._real = np.stack([image_io.load_image(r.image_path, cfg.resolution, cfg.in_channels)
                                   for r in self.records])
        return self._real

    def reconstructions(self) -> np.ndarray:
        """The evaluation images through the VQ-GAN (encode, decode): the best an LM drawing in its
        codes can do; read once."""
        if self._recon is None:
            paths = [r.image_path for r in self.records]
            self._recon = np.concatenate([self.g.decode_codes(self.g.encode_images(paths[sl]))
                                          for _, sl in _batches(len(paths), self.opts.batch_size, "VQ-GAN", False)])
        return self._recon

    def vqgan(self) -> None:
        real, recon = self.real_images(), self.reconstructions()
        self.metrics["vqgan"] = {"psnr": float(image_metrics.psnr(real, recon).mean()),
                                 "ssim": float(image_metrics.ssim(real, recon).mean())}

    def vqa(self, data_root: str) -> None:
        examples = text_corpora.vqa_for_records(text_corpora.read_vqa(data_root), self.records)
        if self.opts.max_vqa:
            examples = examples[: self.opts.max_vqa]
        self.metrics["n_vqa"] = len(examples)
        if not examples:
            self.metrics["vqa"] = {}
            return
        path_of = {r.dicom_id: r.image_path for r in self.records}
        sampling = self._sampling("vqa")
        answers: list[str] = []
        ids: list[dict] = []
        for b, sl in _batches(len(examples), self.opts.batch_size, "CXR-VQA", self.progress):
            chunk = examples[sl]
            made = self.g.answer_results([path_of[e.dicom_id] for e in chunk], [e.question for e in chunk],
                                         sampling, self.opts.seed + b)
            answers += made.texts
            ids += [made.ids(i) for i in range(len(chunk))]
        refs, kinds = [e.answer for e in examples], [e.question_type for e in examples]
        self.metrics["vqa"] = vqa_metrics.vqa_scores(answers, refs, kinds)
        if self.board is not None:
            eval_board.log_answers(self.board, self.g.lm.step, examples, answers)
        if self.opts.ci_samples:  # the score is a mean over questions: resample the questions
            right = np.asarray([vqa_metrics.answer_is_right(a, r, k) for a, r, k in zip(answers, refs, kinds)], float)
            ci = bootstrap_interval(lambda i: right[i].mean(keepdims=True), len(right), samples=self.opts.ci_samples)
            self.metrics["vqa"]["all"]["score_ci"] = ci[0].tolist()
        self.metrics["baselines"]["vqa"] = vqa_metrics.vqa_scores(most_frequent_answers(refs, kinds), refs, kinds)
        with open(os.path.join(self.out, "vqa.jsonl"), "w", encoding="utf-8") as f:
            for e, a, more in zip(examples, answers, ids):
                f.write(json.dumps({"dicom_id": e.dicom_id, "question": e.question, "question_type": e.question_type,
                                    "reference": e.answer, "generated": a} | more) + "\n")


def _write_ids(path: str, dicom_ids: Sequence[str], ids: Sequence[dict]) -> None:
    """One {"dicom_id", "prompt_ids", "generated_ids", "image_codes"} line per row (tasks' *.ids(i))."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"dicom_id": d} | row) + "\n" for d, row in zip(dicom_ids, ids))


def evaluate(ckpt: str, vqgan: str, data: str, out: str, opts: EvalOptions = EvalOptions(),
             progress: bool = True) -> dict:
    """Run the selected tasks and write every output; returns metrics.json's content."""
    if "report" in opts.tasks:
        check_tokenizer(opts.text_tokenizer)  # Java for PTB: fail before reading or generating anything
    networks = (ImageNetworks.load(opts.classifier, opts.txv_weights, opts.inception_weights)
                if "image" in opts.tasks else ImageNetworks())
    missing = protocol.missing_inputs(opts, networks.txv_classifier is not None if opts.txv_weights else None) \
        if opts.protocol == "paper" else []
    if opts.require_all_metrics:
        protocol.require(missing)
    for path in (opts.reference_labels, opts.generated_labels):
        if path:
            labeler.read_label_csv(path)
    eval_list = protocol.paper_eval_list(opts, data) if opts.protocol == "paper" else opts.eval_list
    evaluation_ids = original_recipe.read_id_list(eval_list, "eval_list", "--eval-list") if eval_list else None
    corpus = mimic_cxr.load_corpus(data, reports_root=opts.reports_root, progress=progress,
                                   evaluation_ids=evaluation_ids)
    selection: dict = {"eval_list": os.path.abspath(eval_list) if eval_list else ""}
    if evaluation_ids is not None:
        listed = corpus.list_report()["eval_list"]
        selection |= {"listed": listed["listed"], "not_in_corpus": listed["not_in_corpus"]}
        print(f"evaluate: evaluation list {eval_list}: {listed['listed']} ids, {listed['not_in_corpus']} not in "
              f"{data}'s split csv", file=sys.stderr)
    records = mimic_cxr.evaluation_records(corpus)
    selection["n"] = len(records)
    if opts.max_images:
        records = records[: opts.max_images]
    if not records:
        raise UsageError(f"{data} has no evaluation images (validate/test PA or AP images of each subject's "
                         "earliest study with an impression); check the split CSV")
    g = tasks.Generator.load(ckpt, vqgan, dtype=opts.dtype, clean_up_spaces=opts.clean_up_spaces,
                             allow_image_tokens_in_text=opts.allow_image_tokens_in_text,
                             stop_at_end_key_only=opts.stop_at_end_key_only,
                             keep_special_tokens=opts.keep_special_tokens)
    os.makedirs(out, exist_ok=True)
    inputs = {"checkpoint": os.path.abspath(ckpt), "vqgan": os.path.abspath(vqgan), "data": os.path.abspath(data)}
    with eval_board.open_board(out, inputs, opts) as board:
        ev = Evaluation(g, records, out, opts, progress, networks, board)
        ev.metrics |= inputs | {"options": dataclasses.asdict(opts),
                                "labels_from": ("CSV: " + opts.generated_labels) if opts.generated_labels else
                                "the rule-based CheXpert-style labeler (llmcxr_jax.eval.labeler)",
                                "protocol": protocol.describe(opts, selection, missing)}
        if "report" in opts.tasks:
            ev.reports()
        if "image" in opts.tasks:
            ev.images()
        if "vqa" in opts.tasks:
            ev.vqa(data)
        ev.vqgan()
        eval_board.log_metrics(board, g.lm.step, ev.metrics)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(ev.metrics, f, indent=2, default=float)
    with open(os.path.join(out, "metrics.md"), "w") as f:
        f.write(report_card.markdown(ev.metrics))
    return ev.metrics
