"""Flax NNX modules: the GPT-NeoX causal LM (HF parameter names) with its attention kernels (XLA,
splash, cuDNN / Pallas flash), the taming VQ-GAN, its discriminator, the perceptual (LPIPS-VGG16) and
CIP (DenseNet) feature networks, the torchxrayvision classifier head and the FID Inception-v3."""
