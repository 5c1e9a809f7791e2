"""Tiny VQ-GANs in PyTorch for parity tests: diffusers VQModel and taming's modules."""
import numpy as np

from llmcxr_jax.models.vqgan import VQGANConfig

TINY = dict(resolution=64, in_channels=3, out_channels=3, ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1,
            attn_resolutions=(4,), z_channels=32, embed_dim=32, n_embed=64, beta=0.25, dropout=0.0,
            legacy_loss=True, dtype="float32", param_dtype="float32")


def tiny_config(**kw) -> VQGANConfig:
    return VQGANConfig(**{**TINY, **kw})


def randomise(module, seed=0):
    """Non-trivial norms and a spread-out codebook, so parity tests exercise everything."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif "embedding" in name:
                p.copy_(torch.randn_like(p))
    return module


def diffusers_vq(cfg: VQGANConfig, seed=0):
    from diffusers import VQModel

    from llmcxr_jax.convert.diffusers_vqgan import diffusers_config

    d = {k: v for k, v in diffusers_config(cfg).items() if not k.startswith("_")}
    return randomise(VQModel(**d), seed).eval()


def taming_vq(cfg: VQGANConfig):
    """taming's VQModel without Lightning: the same submodules and key names."""
    import torch
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.vqvae.quantize import VectorQuantizer2

    dd = dict(double_z=False, z_channels=cfg.z_channels, resolution=cfg.resolution, in_channels=cfg.in_channels,
              out_ch=cfg.out_channels, ch=cfg.ch, ch_mult=list(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
              attn_resolutions=list(cfg.attn_resolutions), dropout=cfg.dropout)

    class TamingVQModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = Encoder(**dd)
            self.decoder = Decoder(**dd)
            self.quantize = VectorQuantizer2(cfg.n_embed, cfg.embed_dim, beta=cfg.beta)
            self.quant_conv = torch.nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
            self.post_quant_conv = torch.nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

        def encode(self, x):
            return self.quantize(self.quant_conv(self.encoder(x)))

        def decode(self, quant):
            return self.decoder(self.post_quant_conv(quant))

    return TamingVQModel().eval()


def images(n=2, size=64, channels=3, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, channels)).astype(np.float32)


def nchw(x):
    import torch
    return torch.tensor(np.asarray(x).transpose(0, 3, 1, 2).copy())


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)
