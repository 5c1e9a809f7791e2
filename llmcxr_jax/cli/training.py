"""Training commands: the VQ-GAN, the LM's instruction tuning (both resume by rerunning in the same
WORKDIR), and compile-check, which lowers the same train step ahead of time for a TPU or GPU topology."""
from __future__ import annotations

import json
import os
import sys

from llmcxr_jax.cli.common import Commands, add_config, emit
from llmcxr_jax.errors import UsageError

commands = Commands()
add_parser, run = commands.add_parser, commands.run


def _run_flags(example: str):
    """--config and --workdir, the flags of both trainers."""
    def flags(p) -> None:
        add_config(p, example)
        p.add_argument("--workdir", required=True, help="run directory (resumes when it holds a run)")
    return flags


@commands.add("train-vqgan", "train the VQ-GAN (taming losses + CIP) in WORKDIR; rerun to resume",
              flags=_run_flags("configs/vqgan_f16_1024.py:tiny"))
def train_vqgan(args) -> None:
    from llmcxr_jax import configs
    from llmcxr_jax.train import vqgan

    state = vqgan.train(configs.load_config(args.config, args.overrides), args.workdir)
    emit({"workdir": args.workdir, "step": int(state["step"]), "vqgan": os.path.join(args.workdir, "vqgan"),
          "metrics": os.path.join(args.workdir, "metrics.jsonl")})


@commands.add("train", "instruction-tune the LM (LLM-CXR stage 1 or 2) in WORKDIR; rerun to resume",
              flags=_run_flags("configs/llmcxr_stage1.py:tiny"))
def train(args) -> None:
    from llmcxr_jax import configs
    from llmcxr_jax.infer import train_samples
    from llmcxr_jax.train import lm

    emit({"workdir": args.workdir} | lm.train(configs.load_config(args.config, args.overrides), args.workdir,
                                              sampler=train_samples.sampler))


def _compile_check_flags(p) -> None:
    add_config(p, "configs/llmcxr_stage1.py:3b")
    p.add_argument("--topology", required=True, help="v4-32, v5p-128, v5e-16, v6e-8, or gpu:NxM (hosts x GPUs)")
    p.add_argument("--num-slices", type=int, default=None,
                   help="TPU slices (multi-slice over the data axis); default: the config's train.num_slices")
    p.add_argument("--mesh", default="", help="data,fsdp,tensor sizes; default: the config's train.mesh")
    p.add_argument("--mfu", type=float, default=0.4, help="model-FLOPs utilisation for the step-time estimate")
    p.add_argument("--gpu-type", default=None, help="a100-40g, a100-80g, h100, h200 (gpu:NxM on CPU)")
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument("--compare", action="append", default=[], metavar="KEY=V1,V2",
                   help="compile every combination of these config values (repeatable, e.g. "
                        "model.attention=xla,splash train.logits_chunk=0,512) and print one table")


@commands.add("compile-check", "compile the real train step ahead of time for a TPU topology or GPU mesh; fails "
              "if it does not fit", flags=_compile_check_flags)
def compile_check(args) -> None:
    from llmcxr_jax import configs
    from llmcxr_jax.train import compile_check, lm, topologies

    base = configs.load_config(args.config, args.overrides)
    num_slices = args.num_slices if args.num_slices is not None else int(base.train.num_slices)
    topo = topologies.parse_topology(args.topology, num_slices, args.gpu_type)
    if topo.platform == "gpu":
        topologies.ensure_cpu_devices(topo.num_chips)
    reports = []
    for variant in compile_check.variant_grid(args.compare):
        config = configs.load_config(args.config, [*args.overrides, *variant])
        tokens, flops = lm.step_flops(config)
        report = compile_check.compile_check(lambda mesh, c=config: lm.lower_train_step(c, mesh), args.topology,
                                             num_slices=num_slices, mesh_shape=args.mesh or config.train.mesh,
                                             tokens_per_step=tokens, model_flops_per_step=flops, mfu=args.mfu,
                                             gpu_type=args.gpu_type)
        print(("\n" + " ".join(variant) + "\n" if variant else "") + report.format(), file=sys.stderr)
        reports.append((variant, report))
    if args.compare:
        print("\n" + compile_check.comparison_table(reports), file=sys.stderr)
    out = [dict(r.to_dict(), overrides=list(v)) for v, r in reports] if args.compare else reports[0][1].to_dict()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    fitting = [r for _, r in reports if r.fits]
    if not fitting:
        raise UsageError(reports[0][1].error_line() if len(reports) == 1 else
                         f"no variant fits {args.topology}: {reports[0][1].error_line()}")
    emit(out if args.compare else reports[0][1].to_dict())
