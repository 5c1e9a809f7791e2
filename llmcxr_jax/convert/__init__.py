"""Checkpoints in and out: Hugging Face GPT-NeoX (hf_gpt_neox.py), taming and diffusers VQ-GANs,
PyTorch perceptual / CIP network weights, and the one safe reader of torch files. The only
package that reads PyTorch libraries."""
