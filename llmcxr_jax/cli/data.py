"""Data commands: the synthetic corpus, encoding a MIMIC-CXR-JPG root's images into VQ-GAN code
shards, moving codes to and from LLM-CXR's codebook-indices pickle, and reading LLM-CXR's own
instruction lists out of a clone of its code."""
from __future__ import annotations

import os
import sys

from llmcxr_jax.cli.common import Commands, add_data_root, add_mesh, add_vqgan_ckpt, count_progress, emit

commands = Commands()
add_parser, run = commands.add_parser, commands.run
SKIPPED_SHOWN = 10  # unreadable images encode-images names on stderr; index.json lists every one


def _synth_flags(p) -> None:
    p.add_argument("--out", required=True, help="new directory for the corpus")
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)


@commands.add("synth", "write a synthetic CXR corpus (images, reports, labels, VQA, Dolly) in the MIMIC-CXR-JPG "
              "layout", flags=_synth_flags)
def synth(args) -> None:
    from llmcxr_jax import synthetic

    with count_progress(args.num_images, "synth", "img") as progress:
        summary = synthetic.synthesize(args.out, num_images=args.num_images, image_size=args.image_size,
                                       seed=args.seed, progress=progress)
    keep = ("root", "images", "studies", "subjects", "splits", "vqa_pairs", "dolly_rows")
    emit({k: summary[k] for k in keep if k in summary})


def _encode_images_flags(p) -> None:
    add_vqgan_ckpt(p)
    add_data_root(p)
    p.add_argument("--out", required=True, help="directory for the code shards (rerun to resume)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (a multiple of the data devices)")
    add_mesh(p, "-1,1,1")
    p.add_argument("--workers", type=int, default=0, help="grain worker processes for decoding")
    p.add_argument("--shard-size", type=int, default=4096, help="images per output shard (the resume unit)")


@commands.add("encode-images", "CXR images of a MIMIC-CXR-JPG root -> VQ-GAN codes in ArrayRecord shards "
              "(resumable)", flags=_encode_images_flags)
def encode_images(args) -> None:
    from llmcxr_jax.data import encode, mimic_cxr

    corpus = mimic_cxr.load_corpus(args.data, reports_root=args.reports_root)
    images = [(r.dicom_id, r.image_path) for r in corpus.records]
    summary = encode.encode_images(args.vqgan, images, args.out, batch_size=args.batch_size, mesh=args.mesh,
                                   num_workers=args.workers, shard_size=args.shard_size)
    skipped = summary["skipped_items"]
    for item in skipped[:SKIPPED_SHOWN]:  # an unreadable image is skipped, not fatal: name it here
        print(f"llmcxr encode-images: skipped {item['dicom_id']}: {item['error']}", file=sys.stderr)
    if len(skipped) > SKIPPED_SHOWN:
        print(f"llmcxr encode-images: skipped {len(skipped) - SKIPPED_SHOWN} more unreadable images; the "
              f"skipped_items of {os.path.join(args.out, 'index.json')} list them all", file=sys.stderr)
    keep = ("out_dir", "num_images", "images_encoded", "images_skipped", "shards_encoded", "shards_reused",
            "images_per_s", "codes_per_image", "codebook_size", "index_written")
    emit({k: summary[k] for k in keep} | {"records_skipped_by_reader": corpus.summary()["skipped"]})


def _import_codes_flags(p) -> None:
    p.add_argument("--pickle", required=True, help="LLM-CXR's mimic-cxr-256-txvloss_codebook_indices.pickle")
    p.add_argument("--out", required=True, help="new directory for the code shards")
    p.add_argument("--codes-per-image", type=int, default=256)
    p.add_argument("--codebook-size", type=int, default=1024)


@commands.add("import-codes", "LLM-CXR codebook-indices pickle ({dicom_id: [256 codes]}) -> ArrayRecord code shards",
              flags=_import_codes_flags)
def import_codes(args) -> None:
    from llmcxr_jax.data import codes

    index = codes.import_pickle(args.pickle, args.out, codes_per_image=args.codes_per_image,
                                codebook_size=args.codebook_size)
    emit({"out": args.out, "images": sum(s["count"] for s in index["shards"]), "skipped": index.get("skipped", {})})


def _export_codes_flags(p) -> None:
    p.add_argument("--codes", required=True, help="directory written by encode-images or import-codes")
    p.add_argument("--pickle", required=True, help="file to write ({dicom_id: [codes]}, LLM-CXR's format)")


@commands.add("export-codes", "ArrayRecord code shards -> LLM-CXR codebook-indices pickle", flags=_export_codes_flags)
def export_codes(args) -> None:
    from llmcxr_jax.data import codes

    emit({"pickle": args.pickle, "images": codes.export_pickle(args.codes, args.pickle)})


def _extract_instructions_flags(p) -> None:
    p.add_argument("--original-repo", required=True, metavar="DIR",
                   help="root of a clone of LLM-CXR's code (github.com/hyn2028/llm-cxr), the folder holding training/")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for report_instructions.txt and image_instructions.txt (one instruction per line)")


@commands.add("extract-instructions", "read LLM-CXR's CXR->report and report->CXR instruction lists from its "
              "training/mimiccxr_vq_dataset.py (parsed, never run) into files for train / generate / evaluate",
              flags=_extract_instructions_flags)
def extract_instructions(args) -> None:
    from llmcxr_jax.data import instructions

    lists = instructions.extract_original(args.original_repo)
    paths = instructions.write_instructions(lists, args.out)
    emit({"out": args.out, "source": os.path.join(args.original_repo, instructions.ORIGINAL_SOURCE),
          **{f"{task}_instructions": {"file": paths[task], "count": len(lists[task]),
                                      "from": instructions.ORIGINAL_NAMES[task]} for task in lists}})
