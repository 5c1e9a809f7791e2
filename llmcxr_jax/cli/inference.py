"""Inference commands: run a trained LLM-CXR on its four tasks (generate) and score it on a data
root's evaluation images (evaluate). The work and the files it writes live in infer/ and eval/."""
from __future__ import annotations

import os
import sys

from llmcxr_jax.cli.common import (
    Commands,
    add_data_root,
    add_decoding,
    add_instructions,
    add_lm_ckpt,
    add_sampling,
    add_vqgan_ckpt,
    decoding_settings,
    emit,
    sampling_settings,
    text_decoding_settings,
)
from llmcxr_jax.errors import MissingInputError, UsageError

commands = Commands()
add_parser, run = commands.add_parser, commands.run

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # what --inputs FOLDER picks up
INPUT_FLAG = {"report": "--image", "vqa": "--image", "image": "--report", "text": "--text"}


def _generate_flags(p) -> None:
    add_lm_ckpt(p)
    add_vqgan_ckpt(p)
    p.add_argument("--task", required=True, choices=("report", "image", "vqa", "text"))
    p.add_argument("--image", default=None, help="CXR image file (report, vqa)")
    p.add_argument("--report", default=None, help="report text to draw (image)")
    p.add_argument("--question", default=None, help="question about the image (vqa)")
    p.add_argument("--text", default=None, help="plain instruction (text)")
    add_instructions(p, "report, image")
    p.add_argument("--inputs", default=None, help="batch: a file with one input per line, or an image folder")
    p.add_argument("--out", required=True, help="directory for results.jsonl (text, prompt / generated token ids, "
                   "image codes) and PNGs for --task image")
    add_sampling(p)
    add_decoding(p)
    p.add_argument("--max-new-tokens", type=int, default=None)


@commands.add("generate", "run a trained LLM-CXR: image -> report, report -> image, image + question -> answer, text",
              flags=_generate_flags)
def generate(args) -> None:
    from llmcxr_jax.data import instructions
    from llmcxr_jax.infer import tasks

    inputs = _generate_inputs(args)
    given = instructions.given_instructions([args.task], args.instruction, args.instructions)
    chosen = instructions.sample(given[args.task], len(inputs), args.seed, args.task) if given else None
    tasks.check_sampling(args.greedy, **sampling_settings(args))
    decoding = _decoding(args)
    if args.image_decoding != "constrained" and args.task != "image":
        raise UsageError(f"--image-decoding applies to --task image, not {args.task}")
    g = tasks.Generator.load(args.ckpt, args.vqgan, dtype=args.dtype, clean_up_spaces=not args.keep_tokenization_spaces,
                             **text_decoding_settings(args))
    sampling = tasks.default_sampling(args.task, args.greedy, args.max_new_tokens, g.codes_per_image,
                                      **sampling_settings(args), image_decoding=args.image_decoding)
    rows = tasks.run_task(g, args.task, inputs, args.out, sampling, args.seed, chosen, args.question, **decoding)
    emit({"out": args.out, "task": args.task, "results": rows})
    failed = [r for r in rows if "error" in r]
    if failed:
        raise UsageError(f"{len(failed)} of {len(rows)} reports got no image, e.g. {failed[0]['error']}; "
                         f"{os.path.join(args.out, 'results.jsonl')} marks them; raise --max-retries or use "
                         "--image-decoding constrained")


def _decoding(args) -> dict:
    """--image-decoding / --max-retries checked before a model loads (--max-retries needs retry)."""
    decoding = decoding_settings(args)
    if args.max_retries is not None and args.image_decoding != "retry":
        raise UsageError("--max-retries applies with --image-decoding retry")
    from llmcxr_jax.infer import tasks

    tasks.check_decoding(**decoding, dtype=args.dtype)
    return decoding


def _generate_inputs(args) -> list[str]:
    """--image/--report/--text values, or one per line of --inputs FILE, or every image in a folder."""
    if args.inputs:
        if os.path.isdir(args.inputs):
            if args.task not in ("report", "vqa"):
                raise UsageError(f"--inputs {args.inputs} is a folder; --task {args.task} takes a list file "
                                 "(one input per line)")
            names = sorted(n for n in os.listdir(args.inputs) if n.lower().endswith(IMAGE_SUFFIXES))
            inputs = [os.path.join(args.inputs, n) for n in names]
        elif os.path.isfile(args.inputs):
            from llmcxr_jax import user_files

            inputs = [line for line in user_files.text_lines(args.inputs, "--inputs") if line.strip()]
        else:
            raise MissingInputError(f"--inputs {args.inputs} does not exist; give a list file (one input per line) "
                                    "or an image folder")
        if not inputs:
            what = f"no {'/'.join(IMAGE_SUFFIXES)} image" if os.path.isdir(args.inputs) else "no non-empty line"
            raise UsageError(f"--inputs {args.inputs} has {what}; nothing to generate")
    else:
        given = getattr(args, INPUT_FLAG[args.task][2:])
        if not given:
            raise UsageError(f"--task {args.task} needs {INPUT_FLAG[args.task]} (or --inputs FILE/FOLDER)")
        inputs = [given]
    if args.task == "vqa" and not (args.question or "").strip():
        raise UsageError("--task vqa needs --question")
    return inputs


def _evaluate_flags(p) -> None:
    add_lm_ckpt(p)
    add_vqgan_ckpt(p)
    add_data_root(p)
    p.add_argument("--out", required=True, help="directory for metrics.json, metrics.md, reports.csv, grids and the "
                   "token ids per row (reports.jsonl, images.jsonl, vqa.jsonl)")
    p.add_argument("--tasks", default="report,image,vqa", help="comma-separated subset of report,image,vqa")
    p.add_argument("--max-images", type=int, default=0, help="first N evaluation images (0: all)")
    p.add_argument("--max-vqa", type=int, default=0, help="first N VQA questions of those images (0: all)")
    p.add_argument("--batch-size", type=int, default=16)
    add_instructions(p, "report and image; a FILE or TEXT serves one of them, a DIR both")
    add_sampling(p)
    add_decoding(p)
    p.add_argument("--image-temperature", type=float, default=None,
                   help="when sampling report->CXR images (default: --temperature)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="for reports and answers (0: 128)")
    p.add_argument("--report-part", default="impression", choices=("impression", "findings+impression"),
                   help="reference text: the impression (stage 2) or findings + impression (stage 1)")
    p.add_argument("--classifier", default="", help="CXR classifier directory (AUROC and FID on its features)")
    p.add_argument("--txv-weights", default="", help="`llmcxr convert-weights txv` output: FID on its DenseNet "
                   "features; converted with --classifier, also the paper's report->CXR AUROC / F1 of its classifier")
    p.add_argument("--inception-weights", default="", metavar="FILE",
                   help="torch-fidelity's FID Inception weights (weights-inception-2015-12-05-6726825d.pth): FID on "
                   "Inception features, as the paper's; nothing is downloaded")
    p.add_argument("--protocol", default="", choices=("paper",),
                   help="paper: LLM-CXR's evaluation (its eval_dicom_ids.pickle from --eval-list or DATA, impression "
                   "text, top_p 0.92 / top_k 0 / temperature 1, every metric) with the paper's numbers beside ours; "
                   "options that contradict it are refused")
    p.add_argument("--require-all-metrics", action="store_true",
                   help="with --protocol paper: fail before generating when a paper metric cannot be computed "
                   "(default: metrics.md names the missing columns and the flag that fills each)")
    p.add_argument("--meteor", action="store_true",
                   help="METEOR too, by pycocoevalcap's METEOR 1.5 jar (Java, ~10 s; --protocol paper turns it on); "
                   "without Java metrics.md states it was not computed")
    p.add_argument("--reference-labels", default="",
                   help="CheXpert labeler / CheXbert CSV over OUT/reference_reports.csv (default: ours)")
    p.add_argument("--generated-labels", default="",
                   help="CheXpert labeler / CheXbert CSV over OUT/generated_reports.csv (default: ours)")
    p.add_argument("--grid-images", type=int, default=8, help="columns per real-vs-generated grid (0: no grids)")
    p.add_argument("--text-tokenizer", default="ptb", choices=("ptb", "simple"),
                   help="tokens for BLEU / ROUGE-L / CIDEr-D: pycocoevalcap's PTB tokenizer (needs Java; as the "
                   "COCO toolkit) or ours (lowercased words, no Java)")
    p.add_argument("--eval-list", default="",
                   help="LLM-CXR's eval_dicom_ids.pickle (read without running it) or a .txt of dicom ids: evaluate "
                   "these images instead of rebuilding the selection")
    p.add_argument("--ci-samples", type=int, default=1000,
                   help="bootstrap resamples for 95%% intervals, per finding and on the headline scores (0: none)")


@commands.add("evaluate", "score a trained LLM-CXR on a data root's evaluation images (metrics.json, metrics.md, "
              "grids)", flags=_evaluate_flags)
def evaluate(args) -> None:
    from llmcxr_jax.data import instructions
    from llmcxr_jax.eval import evaluate

    run = tuple(t for t in args.tasks.split(",") if t)
    given = instructions.given_instructions(run, args.instruction, args.instructions)
    opts = evaluate.EvalOptions(tasks=run, max_images=args.max_images,
                                max_vqa=args.max_vqa, batch_size=args.batch_size, greedy=args.greedy, seed=args.seed,
                                **sampling_settings(args),
                                max_new_tokens=args.max_new_tokens, report_part=args.report_part,
                                classifier=args.classifier, txv_weights=args.txv_weights,
                                inception_weights=args.inception_weights, protocol=args.protocol,
                                require_all_metrics=args.require_all_metrics, meteor=args.meteor,
                                reference_labels=args.reference_labels, generated_labels=args.generated_labels,
                                grid_images=args.grid_images, reports_root=args.reports_root, eval_list=args.eval_list,
                                ci_samples=args.ci_samples, image_temperature=args.image_temperature,
                                text_tokenizer=args.text_tokenizer,
                                report_instructions=given.get("report", ()), image_instructions=given.get("image", ()),
                                **_decoding(args), dtype=args.dtype,
                                clean_up_spaces=not args.keep_tokenization_spaces, **text_decoding_settings(args))
    metrics = evaluate.evaluate(args.ckpt, args.vqgan, args.data, args.out, opts)
    with open(os.path.join(args.out, "metrics.md")) as f:
        print(f.read(), file=sys.stderr)
    keep = {"out": args.out, "n_images": metrics["n_images"], "n_vqa": metrics.get("n_vqa", 0)}
    emit(keep | {k: metrics[k] for k in ("vqgan",) if k in metrics})


def _serve_flags(p) -> None:
    add_lm_ckpt(p)
    add_vqgan_ckpt(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0: every interface; the page has no login)")
    p.add_argument("--port", type=int, default=7860, help="port of the page (default 7860, gradio's)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="the LM's compute dtype (weights stay as saved); LLM-CXR generated in bfloat16")


@commands.add("serve", "a web page (gradio) over a trained LLM-CXR: CXR -> report, report -> CXR, CXR + question "
              "-> answer; needs the [serve] extra", flags=_serve_flags)
def serve(args) -> None:
    from llmcxr_jax.serve import server

    running = server.start(args.ckpt, args.vqgan, host=args.host, port=args.port, dtype=args.dtype)
    running.block()
    emit({"url": running.url})
