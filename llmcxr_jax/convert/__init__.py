"""Checkpoints in and out: Hugging Face GPT-NeoX (hf_gpt_neox.py), taming and diffusers VQ-GANs,
PyTorch perceptual / CIP network weights, the one safe reader of torch files, and whether exported
weight files read in full (file_integrity.py, for `llmcxr verify`). The only package that reads PyTorch
libraries."""
