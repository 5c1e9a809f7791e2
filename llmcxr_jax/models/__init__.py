"""Flax NNX modules: the GPT-NeoX causal LM (HF parameter names), the taming VQ-GAN, its
discriminator, and the perceptual (LPIPS-VGG16) and CIP (DenseNet) feature networks."""
