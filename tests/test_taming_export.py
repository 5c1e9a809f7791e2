"""The taming layout export-vqgan writes is what taming and LLM-CXR's demo load: the YAML builds taming's
own VQModel through OmegaConf, which takes the checkpoint strictly and encodes / decodes as we do;
import-vqgan reads the folder back exactly; `llmcxr export` writes the LM, both VQ-GAN formats and a
README whose snippets run and whose demo arguments name the files written.

taming.models.vqgan imports pytorch_lightning and torchvision (through taming.main and taming's LPIPS),
neither installed here; `lightning_free_taming` puts bare stand-ins for them in sys.modules for the
import and takes them (and the taming modules imported on them) out again. Everything the test runs is
taming's own code: OmegaConf.load, taming.main.instantiate_from_config, VQModel, DummyLoss.
"""
import contextlib
import dataclasses
import json
import os
import re
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from generator_helpers import tiny_lm
from lm_helpers import make_tokenizer
from vq_helpers import images, nchw, nhwc, randomise, taming_vq, tiny_config

from llmcxr_jax import checkpoint, cli, sharding
from llmcxr_jax.convert import bundle, diffusers_vqgan, taming_vqgan

torch = pytest.importorskip("torch")
OmegaConf = pytest.importorskip("omegaconf").OmegaConf
pytestmark = pytest.mark.torch

# 32 px, 3 levels (nin_shortcut, attention at the 8 x 8 latent, mid-block attention): an 8 x 8 latent,
# 64 codes. Float32 round-off of the whole decoder stays under 1e-5 here (about 7e-6); through the five
# levels of vq_helpers.tiny_config it reaches 1.6e-5.
CFG = tiny_config(resolution=32, ch_mult=(1, 2, 2), attn_resolutions=(8,))
encode = nnx.jit(lambda m, x: m.encode(x))
decode = nnx.jit(lambda m, c: m.decode(c))
# the taming modules imported on the stand-ins; removed afterwards so no other test sees them
TAMING_ON_STAND_INS = ("taming.main", "taming.models", "taming.models.vqgan", "taming.modules.losses",
                       "taming.modules.losses.vqperceptual", "taming.modules.losses.lpips",
                       "taming.modules.discriminator", "taming.modules.discriminator.model")


def _lightning_stand_ins() -> dict[str, types.ModuleType]:
    """What taming.main and taming.models.vqgan import from pytorch_lightning, and torchvision's name."""
    pl = types.ModuleType("pytorch_lightning")
    pl.LightningModule = torch.nn.Module
    pl.LightningDataModule = object
    pl.seed_everything = lambda seed: None
    parts = {name: types.ModuleType(f"pytorch_lightning.{name}")
             for name in ("trainer", "callbacks", "utilities", "utilities.distributed")}
    parts["trainer"].Trainer = object
    parts["callbacks"].ModelCheckpoint = parts["callbacks"].Callback = parts["callbacks"].LearningRateMonitor = object
    parts["utilities.distributed"].rank_zero_only = lambda fn: fn
    tv = types.ModuleType("torchvision")
    tv.models = types.SimpleNamespace()  # taming's LPIPS needs vgg16 only when built; DummyLoss is not LPIPS
    return {"pytorch_lightning": pl, **{f"pytorch_lightning.{k}": v for k, v in parts.items()}, "torchvision": tv}


@contextlib.contextmanager
def lightning_free_taming():
    stand_ins = _lightning_stand_ins()
    names = tuple(stand_ins) + TAMING_ON_STAND_INS
    saved = {name: sys.modules.pop(name, None) for name in names}
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name, old in saved.items():
            sys.modules.pop(name, None)
            if old is not None:
                sys.modules[name] = old


def taming_from_yaml(config_path: str, ckpt_path: str):
    """taming's VQModel as taming builds one (OmegaConf.load + instantiate_from_config on model.target),
    with the exported state dict loaded strictly."""
    with lightning_free_taming():
        from taming.main import instantiate_from_config

        config = OmegaConf.load(config_path)
        model = instantiate_from_config(config.model)
    sd = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(sd, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def ours():
    """Our model with the weights of a randomised taming-layout module (spread codebook, random norms)."""
    sd = {k: v.numpy() for k, v in randomise(taming_vq(CFG), seed=4).state_dict().items()}
    model, ignored = taming_vqgan.from_taming_state_dict(sd, CFG)
    assert ignored == []
    return model


def _flat(model):
    return {k: np.asarray(v) for k, v in taming_vqgan.flat_params(model).items()}


def test_yaml_builds_tamings_vqmodel_which_loads_strictly_and_agrees(ours, tmp_path):
    files = taming_vqgan.export_taming(ours, str(tmp_path / "taming"))
    assert files.config == str(tmp_path / "taming" / "configs" / "model.yaml")
    assert files.ckpt == str(tmp_path / "taming" / "checkpoints" / "last.ckpt")
    ref = taming_from_yaml(files.config, files.ckpt)
    assert type(ref).__module__ == "taming.models.vqgan" and type(ref).__name__ == "VQModel"
    assert type(ref.loss).__name__ == "DummyLoss" and not list(ref.loss.parameters())
    x = images(3, size=CFG.resolution, seed=5)
    with torch.no_grad():
        quant, loss, (_, _, idx) = ref.encode(nchw(x))
        side = ours.cfg.latent_size
        # codes -> pixels as LLM-CXR's demo does it: codebook rows on the latent grid, then decode
        dec = nhwc(ref.decode(ref.quantize.get_codebook_entry(idx, shape=(3, side, side, -1))))
    codes, losses = encode(ours, jnp.asarray(x))
    assert len(set(np.asarray(codes).ravel().tolist())) > 2  # the images use several codes
    np.testing.assert_array_equal(np.asarray(codes).ravel(), idx.numpy().ravel())
    np.testing.assert_allclose(float(losses["quant_loss"]), float(loss), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(decode(ours, codes)), dec, atol=1e-5, rtol=0)


def test_ckpt_file_gets_its_yaml_beside_it_from_the_cli(ours, tmp_path, capsys):
    ck = str(tmp_path / "orbax")
    checkpoint.save_vqgan(ck, ours)
    out = str(tmp_path / "vq.ckpt")
    assert cli.main(["export-vqgan", "--ckpt", ck, "--format", "taming", "--out", out]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ckpt"] == out and result["config"] == str(tmp_path / "vq.yaml")
    assert sorted(os.listdir(tmp_path)) == ["orbax", "vq.ckpt", "vq.yaml"]
    assert taming_vqgan.config_from_yaml(str(tmp_path / "vq.yaml")) == ours.cfg
    ref = taming_from_yaml(str(tmp_path / "vq.yaml"), out)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    for k, v in taming_vqgan.to_taming_state_dict(ours).items():
        np.testing.assert_array_equal(sd[k], v)


def test_import_of_the_folder_equals_the_model_exported(ours, tmp_path, capsys):
    folder = str(tmp_path / "taming")
    taming_vqgan.export_taming(ours, folder)
    # taming's own log folders also hold a lightning YAML, which has no model section
    with open(os.path.join(folder, "configs", "run-lightning.yaml"), "w") as f:
        f.write("lightning:\n  trainer:\n    max_epochs: 1\n")
    assert cli.main(["import-vqgan", "--taming", folder, "--out", str(tmp_path / "back")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["taming_config"] == os.path.join(folder, "configs", "model.yaml")
    back, _ = checkpoint.load_vqgan(str(tmp_path / "back"), sharding.make_mesh("-1,1,1"))
    assert back.cfg == ours.cfg  # resolution 32 from the YAML: shapes alone would have said 256
    a, b = _flat(ours), _flat(back)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_bad_taming_sources_are_one_line_errors(ours, tmp_path, capsys):
    folder = str(tmp_path / "taming")
    taming_vqgan.export_taming(ours, folder)

    def fails(args, text):
        assert cli.main(["import-vqgan", *args, "--out", str(tmp_path / f"o{len(os.listdir(tmp_path))}")]) == 2
        err = capsys.readouterr().err.strip()
        assert text in err and len(err.splitlines()) == 1, err

    fails(["--taming", folder, "--resolution", "256"], "--resolution 256 disagrees with")
    with open(os.path.join(folder, "configs", "other.yaml"), "w") as f:
        f.write(open(os.path.join(folder, "configs", "model.yaml")).read())
    fails(["--taming", folder], "has 2 model YAMLs (model.yaml, other.yaml); choose one with --taming-config")
    assert cli.main(["import-vqgan", "--taming", folder, "--taming-config",
                     os.path.join(folder, "configs", "other.yaml"), "--out", str(tmp_path / "chosen")]) == 0
    capsys.readouterr()
    os.remove(os.path.join(folder, "checkpoints", "last.ckpt"))
    fails(["--taming", folder], "has no checkpoints/last.ckpt")
    with pytest.raises(Exception, match="is a file; give FILE.ckpt or a folder"):
        taming_vqgan.export_taming(ours, os.path.join(folder, "configs", "model.yaml"))


@pytest.fixture(scope="module")
def lm_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    make_tokenizer(str(root / "tok"))
    return tiny_lm(str(root / "lm"), str(root / "tok"), CFG.n_embed)


def _code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_export_writes_lm_both_vqgans_and_a_readme_that_runs(ours, lm_ckpt, tmp_path, capsys, monkeypatch):
    vq_ck, out = str(tmp_path / "vq"), str(tmp_path / "bundle")
    checkpoint.save_vqgan(vq_ck, ours)
    assert cli.main(["export", "--ckpt", lm_ckpt, "--vqgan", vq_ck, "--out", out]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    t, k = result["text_size"], result["image_codes"]
    assert k == 64 and t > 256
    for rel in ("hf/config.json", "hf/model.safetensors", "hf/tokenizer.json", "hf/README.md",
                "taming/configs/model.yaml", "taming/checkpoints/last.ckpt", "diffusers/config.json",
                f"diffusers/{diffusers_vqgan.WEIGHTS}", "README.md"):
        assert os.path.isfile(os.path.join(out, rel)), rel
    with open(os.path.join(out, "hf", "config.json")) as f:
        assert json.load(f)["vocab_size"] == t + k
    with open(os.path.join(out, "diffusers", "config.json")) as f:
        assert json.load(f)["num_vq_embeddings"] == k
    readme = open(os.path.join(out, "README.md")).read()
    assert f"T = {t} = `len(tokenizer)`" in readme and f"K = {k} VQ-GAN codes" in readme
    assert f"code c is id T + c = {t} + c" in readme and "8 x 8 = 64 codes" in readme
    demo = ('python generate_interactive.py "$BUNDLE/hf" "$BUNDLE/taming/configs/model.yaml" '
            '"$BUNDLE/taming/checkpoints/last.ckpt"')
    assert demo in readme and "so it stops on them as they are." in readme  # T and the latent are not LLM-CXR's
    for rel in ("taming/configs/model.yaml", "taming/checkpoints/last.ckpt", "`hf/`", "`diffusers/`"):
        assert rel in readme

    # the README's snippets, run as written from the bundle folder: both VQ-GANs decode our codes as we do
    transformers_code, diffusers_code, taming_code = _code_blocks(readme, "python")
    monkeypatch.chdir(out)
    x = images(1, size=CFG.resolution, seed=6)
    codes = np.asarray(encode(ours, jnp.asarray(x))[0]).ravel()
    hf_ns: dict = {}
    exec(transformers_code, hf_ns)  # each snippet in a namespace of its own: it imports what it uses
    assert hf_ns["lm"].config.vocab_size == t + k and len(hf_ns["tokenizer"]) == t
    ours_pixels = np.asarray(decode(ours, jnp.asarray(codes[None])))
    with torch.no_grad():
        diffusers_ns = {"image_ids": [int(c) + t for c in codes]}
        exec(diffusers_code, diffusers_ns)
        np.testing.assert_allclose(nhwc(diffusers_ns["pixels"]), ours_pixels, atol=1e-5, rtol=0)
        taming_ns = {"image": nchw(x)}
        with lightning_free_taming():
            exec(taming_code, taming_ns)
    np.testing.assert_array_equal(taming_ns["codes"].numpy(), codes)
    np.testing.assert_allclose(nhwc(taming_ns["pixels"].detach()), ours_pixels, atol=1e-5, rtol=0)


def test_export_refuses_an_lm_whose_k_is_not_the_codebook(lm_ckpt, tmp_path, capsys):
    from llmcxr_jax.models.vqgan import init_vqgan

    vq_ck, out = str(tmp_path / "vq"), str(tmp_path / "bundle")
    checkpoint.save_vqgan(vq_ck, init_vqgan(CFG.replace(n_embed=32), 0))
    assert cli.main(["export", "--ckpt", lm_ckpt, "--vqgan", vq_ck, "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert "the LM has K = 64 image-token rows but the VQ-GAN's codebook has 32 codes" in err
    assert len(err.splitlines()) == 1 and not os.path.exists(out)
    with pytest.raises(Exception, match="K = 64 image-token rows but the VQ-GAN's codebook has 32"):
        bundle.check_codebook(64, 32)


def test_readme_says_whether_the_files_fit_llmcxrs_demo():
    b = bundle.Bundle(out="o", hf="o/hf", hf_files=("model.safetensors",), taming_config="o/taming/configs/model.yaml",
                      taming_ckpt="o/taming/checkpoints/last.ckpt", diffusers="o/diffusers", readme="o/README.md",
                      text_size=50281, image_codes=1024)
    fits = bundle.readme(b, 16, 256, has_tokenizer=True)
    assert "these files match." in fits and "stops on them" not in fits
    assert "ids 50281 .. 51304 are the K = 1024 VQ-GAN codes" in fits and "16 x 16 = 256 codes" in fits
    for other, latent, size in ((b, 16, 512), (b, 32, 512), (dataclasses.replace(b, text_size=50280), 16, 256)):
        assert "stops on them as they are." in bundle.readme(other, latent, size, has_tokenizer=True)
