"""Inference: KV-cache decoding with image spans constrained to image tokens, or LLM-CXR's
sample-and-retry (generate.py, sampling.py), transformers' text clean-up (detokenize.py), and
LLM-CXR's four tasks end to end with the files `llmcxr generate` writes (tasks.py)."""
