"""PyTorch references for tests/test_perceptual.py: LPIPS-VGG16 v0.1 re-stated from lpips 0.1.4, taming's
own LPIPS and the real torchxrayvision DenseNet (both loaded with a stand-in torchvision, which is not
installable next to this torch), with random weights set the way the tests need them.
"""
from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
import warnings

import torch
from torch import nn

# torchvision.models.vgg cfgs["D"] (vgg16)
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
SLICE_ENDS = (4, 9, 16, 23, 30)  # lpips pretrained_networks.vgg16: slices [0,4) [4,9) [9,16) [16,23) [23,30)


def vgg16_features() -> nn.Sequential:
    """torchvision's vgg16().features (make_layers(cfgs['D'], batch_norm=False)): same modules,
    indices and state-dict keys (features.N.weight once wrapped), with random biases."""
    layers: list[nn.Module] = []
    c_in = 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            conv = nn.Conv2d(c_in, v, kernel_size=3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
            nn.init.normal_(conv.bias, 0.0, 0.1)  # torchvision zeroes biases; random ones test them
            layers += [conv, nn.ReLU(inplace=True)]
            c_in = v
    return nn.Sequential(*layers)


class ScalingLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.Tensor([-.030, -.088, -.188])[None, :, None, None])
        self.register_buffer("scale", torch.Tensor([.458, .448, .450])[None, :, None, None])

    def forward(self, inp):
        return (inp - self.shift) / self.scale


class NetLinLayer(nn.Module):
    def __init__(self, chn_in, chn_out=1, use_dropout=True):
        super().__init__()
        layers = [nn.Dropout()] if use_dropout else []
        layers += [nn.Conv2d(chn_in, chn_out, 1, stride=1, padding=0, bias=False)]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class VGG16Slices(nn.Module):
    """lpips.pretrained_networks.vgg16 over a given `features` Sequential."""

    def __init__(self, features: nn.Sequential):
        super().__init__()
        start = 0
        for s, end in enumerate(SLICE_ENDS):
            part = nn.Sequential()
            for x in range(start, end):
                part.add_module(str(x), features[x])
            setattr(self, f"slice{s + 1}", part)
            start = end

    def forward(self, x):
        outs = []
        for s in range(len(SLICE_ENDS)):
            x = getattr(self, f"slice{s + 1}")(x)
            outs.append(x)
        return outs


def normalize_tensor(in_feat, eps=1e-10):
    norm_factor = torch.sqrt(torch.sum(in_feat ** 2, dim=1, keepdim=True))
    return in_feat / (norm_factor + eps)


class LPIPSReference(nn.Module):
    """lpips.LPIPS(net='vgg', version='0.1', lpips=True, spatial=False) in eval mode -> [b, 1, 1, 1]."""

    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Slices(features)
        self.lins = nn.ModuleList([NetLinLayer(c) for c in LPIPS_CHANNELS])
        for k, lin in enumerate(self.lins):
            setattr(self, f"lin{k}", lin)
        self.eval()

    def forward(self, in0, in1):
        outs0, outs1 = self.net(self.scaling_layer(in0)), self.net(self.scaling_layer(in1))
        val = 0
        for kk in range(len(LPIPS_CHANNELS)):
            diff = (normalize_tensor(outs0[kk]) - normalize_tensor(outs1[kk])) ** 2
            val += self.lins[kk](diff).mean([2, 3], keepdim=True)
        return val


def random_lin_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """lpips' weights/v0.1/vgg.pth layout with random non-negative weights (the released ones are >= 0)."""
    g = torch.Generator().manual_seed(seed)
    return {f"lin{k}.model.1.weight": torch.rand((1, c, 1, 1), generator=g) for k, c in enumerate(LPIPS_CHANNELS)}


@contextlib.contextmanager
def _stand_in_modules(stand_ins: dict[str, types.ModuleType], created: tuple[str, ...] = ()):
    """Put modules into sys.modules for an import, then take them (and the `created` modules the
    import adds) out again and restore the warnings filters, so other tests never see them."""
    names = tuple(stand_ins) + created
    saved = {name: sys.modules.get(name) for name in names}
    for name in created:
        sys.modules.pop(name, None)
    sys.modules.update(stand_ins)
    try:
        with warnings.catch_warnings():
            yield
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def taming_lpips(features: nn.Sequential) -> nn.Module:
    """taming.modules.losses.lpips.LPIPS (what VQLPIPSWithDiscriminator runs) on `features`,
    without its download: torchvision.models.vgg16 is a stand-in returning `features`."""
    import importlib

    tv = types.ModuleType("torchvision")
    tv.models = types.SimpleNamespace(vgg16=lambda pretrained: types.SimpleNamespace(features=features))
    with _stand_in_modules({"torchvision": tv}):
        mod = importlib.import_module("taming.modules.losses.lpips")
        real_models, real_load = mod.models, mod.LPIPS.load_from_pretrained
        mod.models = tv.models
        mod.LPIPS.load_from_pretrained = lambda self, name="vgg_lpips": None
        try:
            model = mod.LPIPS()
        finally:
            mod.models, mod.LPIPS.load_from_pretrained = real_models, real_load
    return model.eval()


_TXV: dict[str, types.ModuleType] = {}


def txv_models() -> types.ModuleType:
    """The real torchxrayvision/models.py and utils.py (installed with --no-deps). The package
    __init__ (datasets: pandas, skimage, imageio) is skipped; models.py only reads
    datasets.default_pathologies, utils.py imports skimage without using it in what we call."""
    if "models" in _TXV:
        return _TXV["models"]
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("torchxrayvision is not installed (pip install --no-deps torchxrayvision==1.5.7)")
    package = types.ModuleType("torchxrayvision")
    package.__path__ = list(spec.submodule_search_locations)
    datasets = types.ModuleType("torchxrayvision.datasets")
    datasets.default_pathologies = [  # torchxrayvision 1.5.7 datasets.default_pathologies
        "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis",
        "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia", "Lung Lesion",
        "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum"]
    stand_ins = {"torchxrayvision": package, "torchxrayvision.datasets": datasets,
                 "torchvision": types.ModuleType("torchvision")}
    if importlib.util.find_spec("skimage") is None:
        stand_ins["skimage"] = types.ModuleType("skimage")
    with _stand_in_modules(stand_ins, created=("torchxrayvision.utils", "torchxrayvision.models")):
        for name in ("utils", "models"):
            _TXV[name] = importlib.import_module(f"torchxrayvision.{name}")
    return _TXV["models"]


@torch.no_grad()
def randomise_batchnorm(model: nn.Module, calibration: torch.Tensor, seed: int) -> None:
    """Random affine weights, then running stats from one train-mode pass over `calibration` (so
    eval-mode activations stay O(1) at any input scale), then jittered statistics."""
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
        m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
        m.momentum = 1.0
    model.train()
    model.features2(calibration) if hasattr(model, "features2") else model(calibration)
    for m in norms:
        m.running_mean.add_(0.1 * m.running_var.sqrt() * torch.randn(m.running_mean.shape, generator=g))
        m.running_var.mul_(0.8 + 0.4 * torch.rand(m.running_var.shape, generator=g))
        m.momentum = 0.1
    model.eval()


def random_txv_densenet(calibration_seed: int, batchnorm_seed: int, **densenet_kwargs):
    """(xrv's models module, its DenseNet(**densenet_kwargs) with torch seed 0 weights and BatchNorm running
    statistics randomised on 4 uniform [-1024, 1024] images drawn with calibration_seed); a pytest skip when
    torchxrayvision is absent."""
    import numpy as np
    import pytest

    try:
        models = txv_models()
    except ImportError as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    model = models.DenseNet(**densenet_kwargs)
    images = np.random.default_rng(calibration_seed).uniform(-1, 1, (4, 1, 224, 224)).astype(np.float32)
    randomise_batchnorm(model, torch.from_numpy(1024 * images), seed=batchnorm_seed)
    return models, model
