"""`llmcxr` command line: parses arguments and calls library functions; nothing else lives here."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

COMMANDS = {}
DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")
MULTI_HOST_COMMANDS = ("train", "train-vqgan", "encode-images")  # join jax.distributed first


def command(name: str, help: str):
    def register(fn):
        COMMANDS[name] = (fn, help)
        return fn
    return register


def _size(text: str) -> int:
    units = {"KB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3, "KIB": 1024, "MIB": 1024 ** 2, "GIB": 1024 ** 3, "B": 1}
    t = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * units[unit])
    return int(t)


@contextlib.contextmanager
def _progress(total: int, desc: str):
    """A tensor-count progress bar on stderr, closed before any error is printed."""
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, dynamic_ncols=True) as bar:
        yield lambda _key: bar.update(1)


@contextlib.contextmanager
def _count_bar(total: int, desc: str, unit: str):
    """A progress bar fed cumulative counts; it appears only once work starts, so input errors
    found up front stay one line."""
    from tqdm import tqdm

    bar = None

    def update(done: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


@command("import-hf", "HF GPT-NeoX directory -> orbax checkpoint with K image-token rows")
def import_hf_cmd(args) -> None:
    from llmcxr_jax import sharding
    from llmcxr_jax.convert import hf_gpt_neox
    from llmcxr_jax.data.codes import LLMCXR_CODEBOOK_SIZE
    from llmcxr_jax.train import checkpoint

    if os.path.isdir(args.out) and os.listdir(args.out):
        raise ValueError(f"--out {args.out} is not empty; give a new directory")
    mesh = sharding.make_mesh(args.mesh)
    hf = hf_gpt_neox.read_hf_config(args.hf)
    image_codes = args.image_codes if args.image_codes is not None else \
        int(hf.get(hf_gpt_neox.IMAGE_CODES_KEY, LLMCXR_CODEBOOK_SIZE))
    with _progress(hf_gpt_neox.count_tensors(hf), "import") as tick:
        imp = hf_gpt_neox.import_hf(args.hf, image_codes, mesh=mesh, new_rows=args.new_rows, seed=args.seed,
                                    dtype=args.dtype, param_dtype=args.param_dtype, scan_layers=args.scan_layers,
                                    remat_policy="none", progress=tick)
    meta = checkpoint.lm_metadata(imp.config, imp.layout, imp.special, mesh, imp.hf_config)
    checkpoint.save_params(args.out, imp.model, meta, tokenizer=imp.tokenizer, tokenizer_config=imp.tokenizer_config)
    print(json.dumps({"out": args.out, "text_size": imp.layout.text_size, "image_codes": imp.layout.image_codes,
                      "vocab_rows": imp.layout.size, "padded_rows": imp.layout.padded_size,
                      "tokenizer": imp.tokenizer is not None}))


@command("export-hf", "orbax checkpoint -> HF GPT-NeoX directory (config, safetensors, tokenizer)")
def export_hf_cmd(args) -> None:
    from llmcxr_jax import sharding
    from llmcxr_jax.convert import hf_gpt_neox
    from llmcxr_jax.train import checkpoint

    mesh = sharding.make_mesh(args.mesh)
    lm = checkpoint.load_lm(args.ckpt, mesh)
    with _progress(hf_gpt_neox.count_tensors(lm.config), "export") as tick:
        names = hf_gpt_neox.export_hf(lm.model, args.out, dtype=args.dtype, hf_config=lm.metadata.get("hf_config"),
                                      image_codes=lm.layout.image_codes, tokenizer=lm.tokenizer, tokenizer_config=lm.tokenizer_config,
                                      special=lm.special, max_shard_bytes=_size(args.max_shard_size), progress=tick)
    print(json.dumps({"out": args.out, "files": names, "vocab_size": lm.config.vocab_size, "dtype": args.dtype}))


@command("import-vqgan", "taming / LLM-CXR VQ-GAN .ckpt or diffusers VQModel directory -> orbax checkpoint")
def import_vqgan_cmd(args) -> None:
    from llmcxr_jax.convert import diffusers_vqgan, taming_vqgan
    from llmcxr_jax.train import checkpoint

    if os.path.isdir(args.out) and os.listdir(args.out):
        raise ValueError(f"--out {args.out} is not empty; give a new directory")
    ignored: list[str] = []
    if args.diffusers:
        if args.taming_config or args.resolution is not None:
            raise ValueError("--taming-config and --resolution are for --taming; a diffusers directory's "
                             "config.json gives the architecture")
        model = diffusers_vqgan.import_diffusers(args.diffusers)
    else:
        sd = taming_vqgan.read_ckpt(args.taming)
        if args.taming_config:
            cfg = taming_vqgan.config_from_yaml(args.taming_config)
        else:
            cfg = taming_vqgan.config_from_state_dict(sd, resolution=args.resolution or 256)
        model, ignored = taming_vqgan.from_taming_state_dict(sd, cfg)
    cfg = model.cfg
    checkpoint.save_vqgan(args.out, model, extra_metadata={"source": os.path.abspath(args.diffusers or args.taming)})
    print(json.dumps({"out": args.out, "config": cfg.to_dict(), "codes_per_image": cfg.codes_per_image,
                      "ignored_loss_tensors": len(ignored)}))


@command("export-vqgan", "orbax VQ-GAN checkpoint -> taming .ckpt or diffusers VQModel directory")
def export_vqgan_cmd(args) -> None:
    from llmcxr_jax import sharding
    from llmcxr_jax.convert import diffusers_vqgan, taming_vqgan
    from llmcxr_jax.train import checkpoint

    model, _ = checkpoint.load_vqgan(args.ckpt, sharding.make_mesh("-1,1,1"))
    if args.format == "taming":
        taming_vqgan.write_ckpt(model, args.out)
    else:
        diffusers_vqgan.export_diffusers(model, args.out)
    print(json.dumps({"out": args.out, "format": args.format}))


@command("train-vqgan", "train the VQ-GAN (taming losses + CIP) in WORKDIR; rerun to resume")
def train_vqgan_cmd(args) -> None:
    from llmcxr_jax import configs
    from llmcxr_jax.train import vqgan as train_vqgan

    config = configs.load_config(args.config, args.overrides)
    state = train_vqgan.train(config, args.workdir)
    print(json.dumps({"workdir": args.workdir, "step": int(state["step"]),
                      "vqgan": os.path.join(args.workdir, "vqgan"),
                      "metrics": os.path.join(args.workdir, "metrics.jsonl")}))


@command("train", "instruction-tune the LM (LLM-CXR stage 1 or 2) in WORKDIR; rerun to resume")
def train_cmd(args) -> None:
    from llmcxr_jax import configs
    from llmcxr_jax.train import lm

    config = configs.load_config(args.config, args.overrides)
    print(json.dumps({"workdir": args.workdir} | lm.train(config, args.workdir)))


@command("compile-check", "compile the real train step ahead of time for a TPU topology or GPU mesh; fails if it does not fit")
def compile_check_cmd(args) -> None:
    from llmcxr_jax import configs
    from llmcxr_jax.train import compile_check, lm, topologies

    config = configs.load_config(args.config, args.overrides)
    topo = topologies.parse_topology(args.topology, args.num_slices, args.gpu_type)
    if topo.platform == "gpu":
        topologies.ensure_cpu_devices(topo.num_chips)
    tokens, flops = lm.step_flops(config)
    report = compile_check.compile_check(lambda mesh: lm.lower_train_step(config, mesh), args.topology,
                                         num_slices=args.num_slices, mesh_shape=args.mesh or config.train.mesh,
                                         tokens_per_step=tokens, model_flops_per_step=flops, mfu=args.mfu,
                                         gpu_type=args.gpu_type)
    print(report.format(), file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
    if not report.fits:
        raise ValueError(report.error_line())
    print(json.dumps(report.to_dict()))


@command("generate", "run a trained LLM-CXR: image -> report, report -> image, image + question -> answer, text")
def generate_cmd(args) -> None:
    from llmcxr_jax.data import images as image_io
    from llmcxr_jax.infer import tasks

    inputs = _generate_inputs(args)
    tasks.check_sampling(args.greedy, **_sampling_settings(args))
    g = tasks.Generator.load(args.ckpt, args.vqgan)
    sampling = tasks.default_sampling(args.task, args.greedy, args.max_new_tokens, g.codes_per_image,
                                      **_sampling_settings(args))
    os.makedirs(args.out, exist_ok=True)
    rows = []
    if args.task == "report":
        outputs = g.report(inputs, sampling, args.seed, args.instruction)
    elif args.task == "vqa":
        outputs = g.answer(inputs, [args.question] * len(inputs), sampling, args.seed)
    elif args.task == "text":
        outputs = g.text(inputs, sampling, args.seed)
    else:
        images, codes = g.image(inputs, sampling, args.seed, args.instruction)
        outputs = []
        for i, img in enumerate(images):
            path = os.path.join(args.out, f"image_{i:04d}.png")
            image_io.save_image(img, path)
            outputs.append(path)
    with open(os.path.join(args.out, "results.jsonl"), "w") as f:
        for given, made in zip(inputs, outputs):
            rows.append({"task": args.task, "input": given, "output": made})
            f.write(json.dumps(rows[-1]) + "\n")
    print(json.dumps({"out": args.out, "task": args.task, "results": rows}))


@command("evaluate", "score a trained LLM-CXR on a data root's evaluation images (metrics.json, metrics.md, grids)")
def evaluate_cmd(args) -> None:
    from llmcxr_jax.eval import evaluate

    opts = evaluate.EvalOptions(tasks=tuple(t for t in args.tasks.split(",") if t), max_images=args.max_images,
                                max_vqa=args.max_vqa, batch_size=args.batch_size, greedy=args.greedy, seed=args.seed,
                                **_sampling_settings(args),
                                max_new_tokens=args.max_new_tokens, report_part=args.report_part,
                                classifier=args.classifier, txv_weights=args.txv_weights,
                                reference_labels=args.reference_labels, generated_labels=args.generated_labels,
                                grid_images=args.grid_images, reports_root=args.reports_root,
                                ci_samples=args.ci_samples, image_temperature=args.image_temperature)
    metrics = evaluate.evaluate(args.ckpt, args.vqgan, args.data, args.out, opts)
    with open(os.path.join(args.out, "metrics.md")) as f:
        print(f.read(), file=sys.stderr)
    keep = {"out": args.out, "n_images": metrics["n_images"], "n_vqa": metrics.get("n_vqa", 0)}
    print(json.dumps(keep | {k: metrics[k] for k in ("vqgan",) if k in metrics}))


@command("demo", "the whole loop on a synthetic corpus: data, VQ-GAN, LM stages 1-2, evaluate, export, PyTorch check")
def demo_cmd(args) -> None:
    from llmcxr_jax import configs
    from llmcxr_jax.demo import pipeline

    spec = args.config or f"{DEMO_CONFIG}:{'quick' if args.quick else 'full'}"
    if not args.config and not os.path.isfile(DEMO_CONFIG):
        raise FileNotFoundError(f"{DEMO_CONFIG} not found; pass --config PATH/configs/demo.py[:full|quick]")
    config = configs.load_config(spec, args.overrides)
    workdir = args.workdir or os.path.join("runs", config.name)
    state = pipeline.run(config, workdir)
    print(json.dumps({"workdir": workdir, "summary": os.path.join(workdir, "summary.md"),
                      "minutes": round(sum(e["seconds"] for e in state.values()) / 60, 1),
                      "evaluate": state["evaluate"]["result"], "same_greedy_report_in_pytorch":
                      state["pytorch"]["result"]["same_tokens"]}))


def _sampling_args(p) -> None:
    p.add_argument("--temperature", type=float, default=None, help="when sampling (default: LLM-CXR's 1.0)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus when sampling (default: LLM-CXR's 0.92; 1: off)")
    p.add_argument("--top-k", type=int, default=None, help="when sampling (default: LLM-CXR's 0, off)")


def _sampling_settings(args) -> dict:
    """The --temperature / --top-p / --top-k given; the others keep LLM-CXR's values."""
    given = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    return {k: v for k, v in given.items() if v is not None}


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # what --inputs FOLDER picks up


def _generate_inputs(args) -> list[str]:
    """--image/--report/--text values, or one per line of --inputs FILE, or every image in a folder."""
    given = {"report": args.image, "vqa": args.image, "image": args.report, "text": args.text}[args.task]
    if args.inputs:
        if os.path.isdir(args.inputs):
            if args.task not in ("report", "vqa"):
                raise ValueError(f"--inputs {args.inputs} is a folder; --task {args.task} takes a list file "
                                 "(one input per line)")
            names = sorted(n for n in os.listdir(args.inputs) if n.lower().endswith(IMAGE_SUFFIXES))
            inputs = [os.path.join(args.inputs, n) for n in names]
        elif os.path.isfile(args.inputs):
            with open(args.inputs) as f:
                inputs = [line.rstrip("\n") for line in f if line.strip()]
        else:
            raise FileNotFoundError(f"--inputs {args.inputs} does not exist; give a list file (one input per line) "
                                    "or an image folder")
        if not inputs:
            what = f"no {'/'.join(IMAGE_SUFFIXES)} image" if os.path.isdir(args.inputs) else "no non-empty line"
            raise ValueError(f"--inputs {args.inputs} has {what}; nothing to generate")
        return inputs
    if not given:
        flag = {"report": "--image", "vqa": "--image", "image": "--report", "text": "--text"}[args.task]
        raise ValueError(f"--task {args.task} needs {flag} (or --inputs FILE/FOLDER)")
    if args.task == "vqa" and not (args.question or "").strip():
        raise ValueError("--task vqa needs --question")
    return [given]


@command("convert-weights", "PyTorch LPIPS-VGG16 / torchxrayvision DenseNet weights -> safetensors for train-vqgan")
def convert_weights_cmd(args) -> None:
    from llmcxr_jax.convert import perceptual_weights as W
    from llmcxr_jax.convert.torch_files import read_torch_state_dict

    if args.net == "lpips":
        if args.taming and not (args.vgg16 or args.lin):
            vgg, lin = W.split_taming_lpips(read_torch_state_dict(args.taming, what="taming checkpoint"))
        elif args.vgg16 and args.lin and not args.taming:
            vgg = read_torch_state_dict(args.vgg16, what="torchvision vgg16 state dict")
            lin = read_torch_state_dict(args.lin, what="lpips lin weights (lpips/weights/v0.1/vgg.pth)")
        else:
            raise ValueError("lpips needs --vgg16 VGG16.pth and --lin vgg.pth, or --taming FILE.ckpt")
        arrays = W.convert_lpips(vgg, lin)
    else:
        if not args.state_dict:
            raise ValueError("txv needs --state-dict DENSENET.pth (a torchxrayvision DenseNet state dict)")
        arrays = W.convert_txv_densenet(read_torch_state_dict(args.state_dict, what="torchxrayvision DenseNet state dict"))
    W.save_weights(arrays, args.out)
    print(json.dumps({"out": args.out, "net": args.net, "tensors": len(arrays)}))


@command("synth", "write a synthetic CXR corpus (images, reports, labels, VQA, Dolly) in the MIMIC-CXR-JPG layout")
def synth_cmd(args) -> None:
    from llmcxr_jax.data import synthetic

    with _count_bar(args.num_images, "synth", "img") as progress:
        summary = synthetic.synthesize(args.out, num_images=args.num_images, image_size=args.image_size,
                                       seed=args.seed, progress=progress)
    keep = ("root", "images", "studies", "subjects", "splits", "vqa_pairs", "dolly_rows")
    print(json.dumps({k: summary[k] for k in keep if k in summary}))


@command("encode-images", "CXR images of a MIMIC-CXR-JPG root -> VQ-GAN codes in ArrayRecord shards (resumable)")
def encode_images_cmd(args) -> None:
    from llmcxr_jax.data import encode, mimic_cxr

    corpus = mimic_cxr.load_corpus(args.data, reports_root=args.reports_root)
    images = [(r.dicom_id, r.image_path) for r in corpus.records]
    summary = encode.encode_images(args.vqgan, images, args.out, batch_size=args.batch_size, mesh=args.mesh,
                                   num_workers=args.workers, shard_size=args.shard_size)
    keep = ("out_dir", "num_images", "images_encoded", "images_skipped", "shards_encoded", "shards_reused",
            "images_per_s", "codes_per_image", "codebook_size", "index_written")
    print(json.dumps({k: summary[k] for k in keep} | {"records_skipped_by_reader": corpus.summary()["skipped"]}))


@command("import-codes", "LLM-CXR codebook-indices pickle ({dicom_id: [256 codes]}) -> ArrayRecord code shards")
def import_codes_cmd(args) -> None:
    from llmcxr_jax.data import codes

    index = codes.import_pickle(args.pickle, args.out, codes_per_image=args.codes_per_image,
                                codebook_size=args.codebook_size)
    print(json.dumps({"out": args.out, "images": sum(s["count"] for s in index["shards"]),
                      "skipped": index.get("skipped", {})}))


@command("export-codes", "ArrayRecord code shards -> LLM-CXR codebook-indices pickle")
def export_codes_cmd(args) -> None:
    from llmcxr_jax.data import codes

    n = codes.export_pickle(args.codes, args.pickle)
    print(json.dumps({"pickle": args.pickle, "images": n}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmcxr", description="LLM-CXR in JAX/Flax")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        if name == "import-hf":
            p.add_argument("--hf", required=True, help="HF GPT-NeoX directory (config.json + weights [+ tokenizer])")
            p.add_argument("--out", required=True, help="new directory for the orbax checkpoint")
            p.add_argument("--image-codes", type=int, default=None,
                           help="K, the VQ-GAN codebook size (default: what an llmcxr export records, else "
                                "LLM-CXR's 1024)")
            p.add_argument("--new-rows", choices=("normal", "mean"), default="normal",
                           help="init of the new rows: normal(0, initializer_range) as LLM-CXR, or the mean row")
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--dtype", default="bfloat16", help="compute dtype recorded with the model")
            p.add_argument("--param-dtype", default="float32", help="stored parameter dtype")
            p.add_argument("--scan-layers", action="store_true", help="store layers stacked for lax.scan")
            p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (one may be -1)")
        elif name == "export-hf":
            p.add_argument("--ckpt", required=True, help="orbax LM checkpoint directory (or a train WORKDIR)")
            p.add_argument("--out", required=True, help="directory for the HF files")
            p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
            p.add_argument("--max-shard-size", default="5GB", help="split model.safetensors above this size")
            p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (one may be -1)")
        elif name == "import-vqgan":
            source = p.add_mutually_exclusive_group(required=True)
            source.add_argument("--taming", help="taming / LLM-CXR Lightning .ckpt (or a bare state dict)")
            source.add_argument("--diffusers", help="diffusers VQModel directory (config.json + safetensors)")
            p.add_argument("--out", required=True, help="new directory for the orbax checkpoint")
            p.add_argument("--taming-config", default=None, help="taming model YAML; default: infer from shapes")
            p.add_argument("--resolution", type=int, default=None,
                           help="--taming: input size when inferring (weights do not record it; LLM-CXR: 256)")
        elif name == "convert-weights":
            p.add_argument("net", choices=("lpips", "txv"))
            p.add_argument("--vgg16", default=None, help="torchvision vgg16 state dict (vgg16-397923af.pth)")
            p.add_argument("--lin", default=None, help="lpips weights/v0.1/vgg.pth")
            p.add_argument("--taming", default=None,
                           help="taming / LLM-CXR VQ-GAN .ckpt carrying loss.perceptual_loss.* (instead of --vgg16/--lin)")
            p.add_argument("--state-dict", default=None,
                           help="torch.save(xrv.models.DenseNet(weights='densenet121-res224-all').state_dict(), PATH)")
            p.add_argument("--out", required=True, help="safetensors file to write")
        elif name == "generate":
            p.add_argument("--ckpt", required=True, help="LM checkpoint (import-hf output, or a train WORKDIR or its checkpoints/)")
            p.add_argument("--vqgan", required=True, help="VQ-GAN checkpoint whose codes the LM was trained on (import-vqgan output or a train-vqgan WORKDIR)")
            p.add_argument("--task", required=True, choices=("report", "image", "vqa", "text"))
            p.add_argument("--image", default=None, help="CXR image file (report, vqa)")
            p.add_argument("--report", default=None, help="report text to draw (image)")
            p.add_argument("--question", default=None, help="question about the image (vqa)")
            p.add_argument("--text", default=None, help="plain instruction (text)")
            p.add_argument("--instruction", default=None, help="override the task instruction (report, image)")
            p.add_argument("--inputs", default=None, help="batch: a file with one input per line, or an image folder")
            p.add_argument("--out", required=True, help="directory for results.jsonl (and PNGs for --task image)")
            p.add_argument("--greedy", action="store_true", help="argmax decoding instead of top_p 0.92")
            _sampling_args(p)
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--max-new-tokens", type=int, default=None)
        elif name == "evaluate":
            p.add_argument("--ckpt", required=True, help="LM checkpoint (import-hf output, or a train WORKDIR or its checkpoints/)")
            p.add_argument("--vqgan", required=True, help="VQ-GAN checkpoint whose codes the LM was trained on (import-vqgan output or a train-vqgan WORKDIR)")
            p.add_argument("--data", required=True, help="MIMIC-CXR-JPG layout root (real, or made by `llmcxr synth`)")
            p.add_argument("--out", required=True, help="directory for metrics.json, metrics.md, reports.csv, grids")
            p.add_argument("--tasks", default="report,image,vqa", help="comma-separated subset of report,image,vqa")
            p.add_argument("--max-images", type=int, default=0, help="first N evaluation images (0: all)")
            p.add_argument("--max-vqa", type=int, default=0, help="first N VQA questions of those images (0: all)")
            p.add_argument("--batch-size", type=int, default=16)
            p.add_argument("--greedy", action="store_true", help="argmax decoding instead of top_p 0.92")
            _sampling_args(p)
            p.add_argument("--image-temperature", type=float, default=None,
                           help="when sampling report->CXR images (default: --temperature)")
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--max-new-tokens", type=int, default=0, help="for reports and answers (0: 128)")
            p.add_argument("--report-part", default="impression", choices=("impression", "findings+impression"),
                           help="reference text: the impression (stage 2) or findings + impression (stage 1)")
            p.add_argument("--classifier", default="", help="CXR classifier directory (AUROC and FID on its features)")
            p.add_argument("--txv-weights", default="", help="`llmcxr convert-weights txv` output, for FID (txv)")
            p.add_argument("--reference-labels", default="",
                           help="CheXpert labeler / CheXbert CSV over OUT/reference_reports.csv (default: ours)")
            p.add_argument("--generated-labels", default="",
                           help="CheXpert labeler / CheXbert CSV over OUT/generated_reports.csv (default: ours)")
            p.add_argument("--grid-images", type=int, default=8, help="columns per real-vs-generated grid (0: no grids)")
            p.add_argument("--ci-samples", type=int, default=1000,
                           help="bootstrap resamples for per-finding 95%% intervals (0: none)")
            p.add_argument("--reports-root", default=None, help="unzipped mimic-cxr-reports root; default DATA/reports")
        elif name == "demo":
            p.add_argument("--workdir", default=None, help="run directory (default runs/demo_full or runs/demo_quick); "
                           "rerun to resume")
            p.add_argument("--quick", action="store_true", help="every phase at toy size (a few minutes)")
            p.add_argument("--config", default=None, help="FILE[:VARIANT]; default configs/demo.py:full (or :quick)")
        elif name == "compile-check":
            p.add_argument("--config", required=True, help="FILE[:VARIANT], e.g. configs/llmcxr_stage1.py:3b")
            p.add_argument("--topology", required=True, help="v4-32, v5p-128, v5e-16, v6e-8, or gpu:NxM (hosts x GPUs)")
            p.add_argument("--num-slices", type=int, default=1, help="TPU slices (multi-slice over the data axis)")
            p.add_argument("--mesh", default="", help="data,fsdp,tensor sizes; default: the config's train.mesh")
            p.add_argument("--mfu", type=float, default=0.4, help="model-FLOPs utilisation for the step-time estimate")
            p.add_argument("--gpu-type", default=None, help="a100-40g, a100-80g, h100, h200 (gpu:NxM on CPU)")
            p.add_argument("--json", default=None, help="also write the report here")
        elif name in ("train-vqgan", "train"):
            p.add_argument("--config", required=True, help="FILE[:VARIANT], e.g. configs/vqgan_f16_1024.py:tiny")
            p.add_argument("--workdir", required=True, help="run directory (resumes when it holds a run)")
        elif name == "export-vqgan":
            p.add_argument("--ckpt", required=True, help="orbax VQ-GAN checkpoint directory (or a train-vqgan WORKDIR)")
            p.add_argument("--format", required=True, choices=("taming", "diffusers"))
            p.add_argument("--out", required=True, help="FILE.ckpt for taming, a directory for diffusers")
        elif name == "synth":
            p.add_argument("--out", required=True, help="new directory for the corpus")
            p.add_argument("--num-images", type=int, default=1000)
            p.add_argument("--image-size", type=int, default=256)
            p.add_argument("--seed", type=int, default=0)
        elif name == "encode-images":
            p.add_argument("--vqgan", required=True, help="orbax VQ-GAN checkpoint (import-vqgan output, or a train-vqgan WORKDIR or its vqgan/)")
            p.add_argument("--data", required=True, help="MIMIC-CXR-JPG layout root (real, or made by `llmcxr synth`)")
            p.add_argument("--out", required=True, help="directory for the code shards (rerun to resume)")
            p.add_argument("--reports-root", default=None, help="unzipped mimic-cxr-reports root; default DATA/reports")
            p.add_argument("--batch-size", type=int, default=64, help="global batch (a multiple of the data devices)")
            p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor sizes (one may be -1)")
            p.add_argument("--workers", type=int, default=0, help="grain worker processes for decoding")
            p.add_argument("--shard-size", type=int, default=4096, help="images per output shard (the resume unit)")
        elif name == "import-codes":
            p.add_argument("--pickle", required=True, help="LLM-CXR's mimic-cxr-256-txvloss_codebook_indices.pickle")
            p.add_argument("--out", required=True, help="new directory for the code shards")
            p.add_argument("--codes-per-image", type=int, default=256)
            p.add_argument("--codebook-size", type=int, default=1024)
        elif name == "export-codes":
            p.add_argument("--codes", required=True, help="directory written by encode-images or import-codes")
            p.add_argument("--pickle", required=True, help="file to write ({dicom_id: [codes]}, LLM-CXR's format)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if a.startswith("--config.")]
    if len(overrides) != len(extra) or (overrides and not hasattr(args, "config")):
        parser.error(f"unrecognized arguments: {' '.join(a for a in extra if a not in overrides) or ' '.join(extra)}")
    args.overrides = overrides
    fn, _ = COMMANDS[args.command]
    try:
        if args.command in MULTI_HOST_COMMANDS:
            from llmcxr_jax.distributed import initialize_distributed

            initialize_distributed()  # from SLURM / TPU pod / LLMCXR_* env; nothing on one process
        fn(args)
    except (ValueError, OSError, KeyError) as e:
        print(f"llmcxr {args.command}: error: {_error_message(e)}", file=sys.stderr)
        return 2
    return 0


def _error_message(e: Exception) -> str:
    """One line for a bad input: our own messages as they are; an operating-system error as its path and
    reason (a file where an output directory should go, a full disk) rather than a traceback."""
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        hint = {FileExistsError: "; give a new directory path", NotADirectoryError: " (part of the path is a file)"}
        return f"{e.filename}: {e.strerror}{hint.get(type(e), '')}"
    return str(e)


if __name__ == "__main__":
    sys.exit(main())
