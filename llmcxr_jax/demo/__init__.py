"""`llmcxr demo`: the whole LLM-CXR loop on a synthetic corpus (pipeline.py), and its summary.md."""
