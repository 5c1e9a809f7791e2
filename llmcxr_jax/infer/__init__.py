"""Inference: KV-cache decoding with image spans constrained to image tokens (generate.py,
sampling.py), and LLM-CXR's four tasks end to end with the files `llmcxr generate` writes (tasks.py)."""
