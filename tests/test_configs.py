"""Every config file parses in every variant; overrides are checked; variant shapes match HF."""
import glob
import os

import pytest

from llmcxr_jax import configs
from llmcxr_jax.errors import UsageError
from llmcxr_jax.models.gpt_neox import GPTNeoXConfig, count_params
from llmcxr_jax.vocab import VocabLayout

ROOT = os.path.join(os.path.dirname(__file__), "..", "configs")
FILES = sorted(glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True))


def _variants(path):
    module = configs._load_module(path)
    return getattr(module, "VARIANTS", (None,))


@pytest.mark.parametrize("path", FILES, ids=[os.path.relpath(f, ROOT) for f in FILES])
def test_every_config_file_parses(path):
    for variant in _variants(path):
        cfg = configs.load_config(f"{path}:{variant}" if variant else path)
        assert len(cfg) > 0


def test_overrides_change_typed_values_and_reject_unknown_keys():
    path = os.path.join(ROOT, "gpt_neox.py")
    cfg = configs.load_config(f"{path}:tiny", ["--config.num_layers=3", "config.dtype=float32", "scan_layers=true"])
    assert cfg.num_layers == 3 and cfg.dtype == "float32" and cfg.scan_layers is True
    with pytest.raises(UsageError, match="config has no key 'num_layer'"):
        configs.load_config(f"{path}:tiny", ["num_layer=3"])
    with pytest.raises(ValueError, match="num_layers is an int"):
        configs.load_config(f"{path}:tiny", ["num_layers=three"])
    with pytest.raises(ValueError, match="unknown GPT-NeoX variant"):
        configs.load_config(f"{path}:7b-typo")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        configs.load_config("configs/nope.py")


@pytest.mark.torch
@pytest.mark.parametrize("variant", ["tiny", "dolly-v2-3b", "pythia-6.9b", "pythia-12b"])
def test_variant_parameter_count_equals_transformers(variant):
    """Same shapes as HF GPT-NeoX (built on the meta device), plus K image rows in both tables."""
    import torch
    from transformers import GPTNeoXConfig as HFConfig
    from transformers import GPTNeoXForCausalLM

    c = configs.load_config(f"{os.path.join(ROOT, 'gpt_neox.py')}:{variant}")
    hf_cfg = HFConfig(vocab_size=c.text_size + c.image_codes, hidden_size=c.hidden_size,
                      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                      intermediate_size=c.intermediate_size, rotary_pct=c.rotary_pct)
    with torch.device("meta"):
        hf_params = sum(p.numel() for p in GPTNeoXForCausalLM(hf_cfg).parameters())
    layout = VocabLayout.create(c.text_size, c.image_codes)
    ours = count_params(GPTNeoXConfig.from_config(c, layout))
    padding = 2 * (layout.padded_size - layout.size) * c.hidden_size
    assert ours - padding == hf_params
    if variant == "dolly-v2-3b":
        assert 2.7e9 < hf_params < 2.9e9  # "2.8B"


@pytest.mark.parametrize("name", ["llmcxr_stage1.py", "llmcxr_stage2.py"])
def test_original_variants_set_llmcxr_data_recipe_and_ours_stay_default(name):
    """Every size has an "_original" twin that differs from it only in LLM-CXR's data recipe (parity directions,
    its interleave mix, unpacked rows, 16 per step, its shipped lists) and in the config name."""
    path = os.path.join(ROOT, name)
    variants = _variants(path)
    sizes = [v for v in variants if not v.endswith("_original")]
    assert sorted(variants) == sorted(sizes + [f"{v}_original" for v in sizes]) and "3b_original" in variants
    assert _variants(path) == _variants(os.path.join(ROOT, "llmcxr_stage1.py"))
    for size in sizes:
        ours, original = configs.load_config(f"{path}:{size}"), configs.load_config(f"{path}:{size}_original")
        d = ours.data
        assert (d.directions, d.mix, d.packing, d.stage2_list, d.eval_list) == ("both", "fixed", True, "", "")
        o = original.data
        assert (o.directions, o.mix, o.packing, original.train.batch_size) == ("parity", "original", False, 16)
        assert o.stage2_list == "{data.root}/mimic-cxr-2.0.0-selected-pa-ap-earlist-study.pickle"
        assert o.eval_list == "{data.root}/eval_dicom_ids.pickle"
        a, b = ours.to_dict(), original.to_dict()
        changed = {f"data.{k}" for k in a["data"] if a["data"][k] != b["data"][k]}
        changed |= {f"{s}.{k}" for s in ("train", "model") for k in a[s] if a[s][k] != b[s][k]}
        assert changed <= {"data.directions", "data.mix", "data.packing", "data.stage2_list", "data.eval_list",
                           "train.batch_size"}, changed
        assert b["name"] == a["name"] + "_original"
    with pytest.raises(ValueError, match="unknown variant '3b_orig'"):
        configs.load_config(f"{path}:3b_orig")
