"""Test set-up: 8 host CPU devices so every sharding path runs, float32 matmuls, no network."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from llmcxr_jax import distributed  # noqa: E402

distributed.mark_absl_flags_parsed()  # grain workers in the tests, as the llmcxr entry point does
# Runs that rebuild the same jitted step (resume tests) reuse its compilation.
jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# With CI=true a skipped torch parity test fails the run (tests/ci_skips.py; proven in tests/test_ci_skips.py).
from ci_skips import pytest_make_collect_report, pytest_runtest_makereport  # noqa: E402, F401

# The quick demo, built once per run (once for all pytest-xdist workers): tests/demo_fixture.py.
from demo_fixture import quick_demo  # noqa: E402, F401

# `llmcxr serve` on that model, started and compiled once per process: tests/serve_fixture.py.
from serve_fixture import served  # noqa: E402, F401
