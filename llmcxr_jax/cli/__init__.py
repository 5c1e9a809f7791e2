"""`llmcxr`: main.py builds the parser from one module per command family (convert, data,
training, inference, verify, demo), each with its flags beside its handler."""
from llmcxr_jax.cli.main import main

__all__ = ["main"]
