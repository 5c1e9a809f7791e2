"""`llmcxr demo`: the whole loop on a synthetic corpus, phase by phase in one workdir (demo/)."""
from __future__ import annotations

import os

from llmcxr_jax.cli.common import Commands, emit

commands = Commands()
add_parser, run = commands.add_parser, commands.run


def _demo_flags(p) -> None:
    p.add_argument("--workdir", default=None, help="run directory (default runs/demo_full or runs/demo_quick); "
                   "rerun to resume")
    p.add_argument("--quick", action="store_true", help="every phase at toy size (a few minutes)")
    p.add_argument("--config", default=None, help="FILE[:VARIANT]; default configs/demo.py:full (or :quick)")


@commands.add("demo", "the whole loop on a synthetic corpus: data, VQ-GAN, LM stages 1-2, evaluate, export, "
              "PyTorch check", flags=_demo_flags)
def demo(args) -> None:
    from llmcxr_jax import configs
    from llmcxr_jax.demo import pipeline

    # the checkout's configs/demo.py, or the copy an installed wheel ships (llmcxr_jax/configs_files/)
    spec = args.config or f"{configs.shipped_config('demo.py')}:{'quick' if args.quick else 'full'}"
    config = configs.load_config(spec, args.overrides)
    workdir = args.workdir or os.path.join("runs", config.name)
    state = pipeline.run(config, workdir)
    emit({"workdir": workdir, "summary": os.path.join(workdir, "summary.md"),
          "minutes": round(sum(e["seconds"] for e in state.values()) / 60, 1),
          "evaluate": state["evaluate"]["result"],
          "same_greedy_report_in_pytorch": state["pytorch"]["result"]["same_tokens"],
          "serve": pipeline.serve_command(workdir)})
