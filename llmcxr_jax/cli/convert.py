"""Conversion commands: Hugging Face GPT-NeoX and taming / diffusers VQ-GAN checkpoints in and out,
and the PyTorch perceptual / CIP network weights train-vqgan reads."""
from __future__ import annotations

import os

from llmcxr_jax.cli.common import Commands, add_lm_ckpt, add_mesh, add_vqgan_ckpt, byte_size, emit, tensor_progress
from llmcxr_jax.errors import UsageError

commands = Commands()
add_parser, run = commands.add_parser, commands.run


def _new_dir(path: str) -> None:
    if os.path.isdir(path) and os.listdir(path):
        raise UsageError(f"--out {path} is not empty; give a new directory")


def _import_hf_flags(p) -> None:
    p.add_argument("--hf", required=True, help="HF GPT-NeoX directory (config.json + weights [+ tokenizer])")
    p.add_argument("--out", required=True, help="new directory for the orbax checkpoint")
    p.add_argument("--image-codes", type=int, default=None,
                   help="K, the VQ-GAN codebook size (default: what an llmcxr export records, else LLM-CXR's 1024)")
    p.add_argument("--new-rows", choices=("normal", "mean"), default="normal",
                   help="init of the new rows: normal(0, initializer_range) as LLM-CXR, or the mean row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", help="compute dtype recorded with the model")
    p.add_argument("--param-dtype", default="float32", help="stored parameter dtype")
    p.add_argument("--scan-layers", action="store_true", help="store layers stacked for lax.scan")
    add_mesh(p, "1,-1,1")


@commands.add("import-hf", "HF GPT-NeoX directory -> orbax checkpoint with K image-token rows", flags=_import_hf_flags)
def import_hf(args) -> None:
    from llmcxr_jax import checkpoint, sharding
    from llmcxr_jax.convert import hf_gpt_neox
    from llmcxr_jax.data.codes import LLMCXR_CODEBOOK_SIZE

    _new_dir(args.out)
    mesh = sharding.make_mesh(args.mesh)
    hf = hf_gpt_neox.read_hf_config(args.hf)
    image_codes = args.image_codes if args.image_codes is not None else \
        int(hf.get(hf_gpt_neox.IMAGE_CODES_KEY, LLMCXR_CODEBOOK_SIZE))
    with tensor_progress(hf_gpt_neox.count_tensors(hf), "import") as tick:
        imp = hf_gpt_neox.import_hf(args.hf, image_codes, mesh=mesh, new_rows=args.new_rows, seed=args.seed,
                                    dtype=args.dtype, param_dtype=args.param_dtype, scan_layers=args.scan_layers,
                                    remat_policy="none", progress=tick)
    meta = checkpoint.lm_metadata(imp.config, imp.layout, imp.special, mesh, imp.hf_config)
    checkpoint.save_params(args.out, imp.model, meta, tokenizer=imp.tokenizer, tokenizer_config=imp.tokenizer_config)
    emit({"out": args.out, "text_size": imp.layout.text_size, "image_codes": imp.layout.image_codes,
          "vocab_rows": imp.layout.size, "padded_rows": imp.layout.padded_size, "tokenizer": imp.tokenizer is not None})


def _export_hf_flags(p) -> None:
    p.add_argument("--ckpt", required=True, help="orbax LM checkpoint directory (or a train WORKDIR)")
    p.add_argument("--out", required=True, help="directory for the HF files")
    _hf_weight_flags(p)


def _hf_weight_flags(p) -> None:
    """How the LM's HF weights are written (export-hf, export)."""
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the LM's weight files")
    p.add_argument("--weights", default="safetensors", choices=("safetensors", "bin", "both"),
                   help="model.safetensors, pytorch_model.bin (for stacks without safetensors, such as LLM-CXR's "
                        "transformers 4.28.1), or both")
    p.add_argument("--max-shard-size", default="5GB", help="split the weight files into shards above this size")
    add_mesh(p, "1,-1,1")


@commands.add("export-hf", "orbax checkpoint -> HF GPT-NeoX directory (config, safetensors / .bin, tokenizer)",
              flags=_export_hf_flags)
def export_hf(args) -> None:
    from llmcxr_jax import checkpoint, sharding
    from llmcxr_jax.convert import hf_gpt_neox, weight_files

    max_shard_bytes = byte_size(args.max_shard_size)
    weight_files.weight_formats(args.weights)  # torch missing for .bin: said before the checkpoint is read
    lm = checkpoint.load_lm(args.ckpt, sharding.make_mesh(args.mesh))
    with tensor_progress(hf_gpt_neox.count_tensors(lm.config), "export") as tick:
        names = hf_gpt_neox.export_hf(lm.model, args.out, dtype=args.dtype, hf_config=lm.metadata.get("hf_config"),
                                      image_codes=lm.layout.image_codes, tokenizer=lm.tokenizer,
                                      tokenizer_config=lm.tokenizer_config, special=lm.special,
                                      weights=args.weights, max_shard_bytes=max_shard_bytes, progress=tick)
    emit({"out": args.out, "files": names, "vocab_size": lm.config.vocab_size, "dtype": args.dtype})


def _import_vqgan_flags(p) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--taming", help="taming / LLM-CXR Lightning .ckpt (or a bare state dict), or a taming "
                        "folder (configs/*.yaml + checkpoints/last.ckpt, as export-vqgan --format taming writes)")
    source.add_argument("--diffusers", help="diffusers VQModel directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="new directory for the orbax checkpoint")
    p.add_argument("--taming-config", default=None, help="taming model YAML; default: the folder's configs/*.yaml "
                   "or FILE.yaml beside FILE.ckpt, else infer from shapes")
    p.add_argument("--resolution", type=int, default=None,
                   help="--taming: input size when inferring (weights do not record it; LLM-CXR: 256)")


@commands.add("import-vqgan", "taming / LLM-CXR VQ-GAN .ckpt or diffusers VQModel directory -> orbax checkpoint",
              flags=_import_vqgan_flags)
def import_vqgan(args) -> None:
    from llmcxr_jax import checkpoint
    from llmcxr_jax.convert import diffusers_vqgan, taming_vqgan

    _new_dir(args.out)
    ignored: list[str] = []
    if args.diffusers:
        if args.taming_config or args.resolution is not None:
            raise UsageError("--taming-config and --resolution are for --taming; a diffusers directory's "
                             "config.json gives the architecture")
        model = diffusers_vqgan.import_diffusers(args.diffusers)
    else:
        files = taming_vqgan.find_taming_files(args.taming, args.taming_config)
        sd = taming_vqgan.read_ckpt(files.ckpt)
        if files.config:
            cfg = taming_vqgan.config_from_yaml(files.config)
            if args.resolution not in (None, cfg.resolution):
                raise UsageError(f"--resolution {args.resolution} disagrees with {files.config} "
                                 f"(resolution {cfg.resolution}); leave it out")
        else:
            cfg = taming_vqgan.config_from_state_dict(sd, resolution=args.resolution or 256)
        model, ignored = taming_vqgan.from_taming_state_dict(sd, cfg)
    checkpoint.save_vqgan(args.out, model, extra_metadata={"source": os.path.abspath(args.diffusers or args.taming)})
    emit({"out": args.out, "config": model.cfg.to_dict(), "codes_per_image": model.cfg.codes_per_image,
          "ignored_loss_tensors": len(ignored), **({} if args.diffusers else {"taming_config": files.config})})


def _export_vqgan_flags(p) -> None:
    p.add_argument("--ckpt", required=True, help="orbax VQ-GAN checkpoint directory (or a train-vqgan WORKDIR)")
    p.add_argument("--format", required=True, choices=("taming", "diffusers"))
    p.add_argument("--out", required=True, help="taming: a folder (configs/model.yaml, checkpoints/last.ckpt) or "
                   "FILE.ckpt (FILE.yaml beside it); diffusers: a folder")


@commands.add("export-vqgan", "orbax VQ-GAN checkpoint -> taming folder / .ckpt + YAML or diffusers VQModel directory",
              flags=_export_vqgan_flags)
def export_vqgan(args) -> None:
    from llmcxr_jax import checkpoint, sharding
    from llmcxr_jax.convert import diffusers_vqgan, taming_vqgan

    model, _ = checkpoint.load_vqgan(args.ckpt, sharding.make_mesh("-1,1,1"))
    if args.format == "taming":
        files = taming_vqgan.export_taming(model, args.out)
        emit({"out": args.out, "format": args.format, "ckpt": files.ckpt, "config": files.config})
    else:
        diffusers_vqgan.export_diffusers(model, args.out)
        emit({"out": args.out, "format": args.format})


def _export_flags(p) -> None:
    add_lm_ckpt(p)
    add_vqgan_ckpt(p)
    p.add_argument("--out", required=True, help="new directory: hf/, taming/, diffusers/ and README.md")
    _hf_weight_flags(p)


@commands.add("export", "LM + VQ-GAN -> one folder for PyTorch: HF LM, taming and diffusers VQ-GAN, README",
              flags=_export_flags)
def export(args) -> None:
    from llmcxr_jax import checkpoint, sharding
    from llmcxr_jax.convert import bundle, hf_gpt_neox

    max_shard_bytes = byte_size(args.max_shard_size)
    _new_dir(args.out)
    vqgan, _ = checkpoint.load_vqgan(args.vqgan, sharding.make_mesh("-1,1,1"))
    # K is checked before the LM's weights are read
    bundle.check_codebook(checkpoint.read_lm_metadata(checkpoint.model_dir(args.ckpt, "lm")).layout.image_codes,
                          vqgan.cfg.n_embed)
    lm = checkpoint.load_lm(args.ckpt, sharding.make_mesh(args.mesh))
    with tensor_progress(hf_gpt_neox.count_tensors(lm.config), "export") as tick:
        b = bundle.write_bundle(lm, vqgan, args.out, dtype=args.dtype, weights=args.weights,
                                max_shard_bytes=max_shard_bytes, progress=tick)
    emit({"out": b.out, "hf": b.hf, "hf_files": list(b.hf_files), "taming_config": b.taming_config,
          "taming_ckpt": b.taming_ckpt, "diffusers": b.diffusers, "readme": b.readme, "text_size": b.text_size,
          "image_codes": b.image_codes})


def _convert_weights_flags(p) -> None:
    p.add_argument("net", choices=("lpips", "txv"))
    p.add_argument("--vgg16", default=None, help="torchvision vgg16 state dict (vgg16-397923af.pth)")
    p.add_argument("--lin", default=None, help="lpips weights/v0.1/vgg.pth")
    p.add_argument("--taming", default=None,
                   help="taming / LLM-CXR VQ-GAN .ckpt carrying loss.perceptual_loss.* (instead of --vgg16/--lin)")
    p.add_argument("--state-dict", default=None,
                   help="txv: torch.save(xrv.models.DenseNet(weights='densenet121-res224-all').state_dict(), PATH), "
                        "or a whole pickled xrv DenseNet (the .pt files xrv downloads); read without running it")
    p.add_argument("--classifier", action="store_true",
                   help="txv: keep the classifier head and op_threshs too (for evaluate --txv-weights); the file "
                        "still serves FID / CIP")
    p.add_argument("--xrv-weights", default=None,
                   help="txv --classifier: the xrv weights name (e.g. densenet121-res224-all); its pathology names "
                        "and op_threshs, as xrv sets them, for a file that lacks op_threshs")
    p.add_argument("--out", required=True, help="safetensors file to write")


@commands.add("convert-weights", "PyTorch LPIPS-VGG16 / torchxrayvision DenseNet weights -> safetensors for "
              "train-vqgan and evaluate", flags=_convert_weights_flags)
def convert_weights(args) -> None:
    from llmcxr_jax.convert import perceptual_weights as W
    from llmcxr_jax.convert.torch_files import read_torch_state_dict

    if args.net == "lpips":
        if args.classifier or args.xrv_weights:
            raise UsageError("--classifier and --xrv-weights are for txv")
        if args.taming and not (args.vgg16 or args.lin):
            vgg, lin = W.split_taming_lpips(read_torch_state_dict(args.taming, what="taming checkpoint"))
        elif args.vgg16 and args.lin and not args.taming:
            vgg = read_torch_state_dict(args.vgg16, what="torchvision vgg16 state dict")
            lin = read_torch_state_dict(args.lin, what="lpips lin weights (lpips/weights/v0.1/vgg.pth)")
        else:
            raise UsageError("lpips needs --vgg16 VGG16.pth and --lin vgg.pth, or --taming FILE.ckpt")
        arrays = W.convert_lpips(vgg, lin)
    else:
        if not args.state_dict:
            raise UsageError("txv needs --state-dict DENSENET.pth (a torchxrayvision DenseNet state dict)")
        if args.xrv_weights and not args.classifier:
            raise UsageError("--xrv-weights names the classifier's pathologies and op_threshs; add --classifier")
        sd = W.read_txv_weights(args.state_dict)
        if args.classifier:
            weights = W.convert_txv_classifier(sd, xrv_weights=args.xrv_weights, what=args.state_dict)
            W.save_txv_classifier(weights, args.out)
            emit({"out": args.out, "net": "txv classifier", "tensors": len(weights.arrays),
                  "targets": [t for t in weights.targets if t]})
            return
        arrays = W.convert_txv_densenet(sd)
    W.save_weights(arrays, args.out)
    emit({"out": args.out, "net": args.net, "tensors": len(arrays)})
