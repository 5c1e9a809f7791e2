"""`python -m llmcxr_jax.cli ...` runs the `llmcxr` command (as the launchers and tests do)."""
import sys

from llmcxr_jax.cli.main import main

sys.exit(main())
