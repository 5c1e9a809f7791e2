"""compile-check: topology names -> chips and slice shapes, the report's arithmetic, and real
ahead-of-time compiles of a GPT-NeoX train step: CPU stand-ins for gpu:2x4 always, TPU v4-16
(fits), v5e-4 (pythia-12b without fsdp: does not fit) and the trainer's step on 2 x v5p-8 slices
with `-m tpu` when libtpu is installed."""
import importlib.util
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from configs import gpt_neox as gpt_neox_configs
from llmcxr_jax import configs, sharding
from llmcxr_jax.models.gpt_neox import GPTNeoXConfig, abstract_model, count_params, model_flops_per_token
from llmcxr_jax.sharding import param_shardings
from llmcxr_jax.train import compile_check as cc
from llmcxr_jax.train import lm, topologies
from llmcxr_jax.train.topologies import GiB
from llmcxr_jax.vocab import VocabLayout

STAGE1 = os.path.join(os.path.dirname(__file__), "..", "configs", "llmcxr_stage1.py")

_no_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu not installed (pip install 'llmcxr-jax[tpu]'): no TPU topologies")


def needs_libtpu(test):
    """Marked `tpu` (deselected by default in pytest.ini; run with -m tpu) and skipped without libtpu."""
    return pytest.mark.tpu(_no_libtpu(test))


# ---------------------------------------------------------------- a stand-in train step

def model_config(variant: str) -> GPTNeoXConfig:
    c = gpt_neox_configs.get_config(variant)
    return GPTNeoXConfig.from_config(c, VocabLayout.create(c.text_size, c.image_codes))


def model_flops(cfg: GPTNeoXConfig, batch: int, length: int) -> float:
    """6 x matmul params x tokens + attention (12 x layers x hidden x length per token)."""
    params = nnx.state(abstract_model(cfg), nnx.Param).to_pure_dict()
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params)) - cfg.padded_vocab_size * cfg.hidden_size
    return batch * length * (6.0 * n + 12.0 * cfg.num_layers * cfg.hidden_size * length)


class StandInStep:
    """lower(mesh): next-token loss, grads and an AdamW update of GPT-NeoX, on abstract sharded
    arguments only (nothing is allocated, so a 12B model costs nothing to lower)."""

    def __init__(self, cfg: GPTNeoXConfig, batch: int, length: int):
        self.cfg, self.batch, self.length = cfg, batch, length
        self.args = None  # the abstract arguments of the last lowering

    def __call__(self, mesh):
        tx = optax.adamw(1e-4)
        graphdef, params = nnx.split(abstract_model(self.cfg), nnx.Param)
        p_sh = param_shardings(params, mesh).to_pure_dict()
        p_sds = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                             params.to_pure_dict(), p_sh)
        opt_abstract = jax.eval_shape(tx.init, p_sds)
        replicated = NamedSharding(mesh, PartitionSpec())
        opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, p_sh,
                                       transform_non_params=lambda _: replicated)
        o_sds = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), opt_abstract, opt_sh)
        b_sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
        ids = jax.ShapeDtypeStruct((self.batch, self.length), jnp.int32, sharding=b_sh)  # [batch, length]
        mask = jax.ShapeDtypeStruct((self.batch, self.length), jnp.float32, sharding=b_sh)

        def loss_fn(p, ids, mask):
            full = jax.tree.map(lambda x: x, params)  # a fresh State to fill with the traced arrays
            full.replace_by_pure_dict(p)
            logits = nnx.merge(graphdef, full)(ids)[:, :-1]  # [batch, length - 1, vocab] float32
            ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[:, 1:, None], -1)[..., 0]
            return jnp.sum(ce * mask[:, 1:]) / jnp.maximum(jnp.sum(mask[:, 1:]), 1.0)

        def step(p, opt, ids, mask):
            loss, grads = jax.value_and_grad(loss_fn)(p, ids, mask)
            updates, opt = tx.update(grads, opt, p)
            return optax.apply_updates(p, updates), opt, loss

        self.args = (p_sds, o_sds, ids, mask)
        jitted = jax.jit(step, in_shardings=(p_sh, opt_sh, b_sh, b_sh), out_shardings=(p_sh, opt_sh, replicated),
                         donate_argnums=(0, 1))
        return jitted.lower(*self.args)

    def argument_bytes_per_device(self) -> int:
        """Per-device bytes of the arguments, from shard shapes: what XLA should report."""
        return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
                   for x in jax.tree.leaves(self.args))


# ---------------------------------------------------------------- names and the chip table

@pytest.mark.parametrize("name, chip, chips, tpu_topology, config, wrap", [
    ("v4-8", "v4", 4, "v4:2x2x1", "megacore", (False,) * 3),
    ("v4-16", "v4", 8, "v4:2x2x2", "megacore", (False,) * 3),
    ("v4-32", "v4", 16, "v4:2x2x4", "megacore", (False,) * 3),
    ("v4-128", "v4", 64, "v4:4x4x4", "megacore", (True,) * 3),
    ("v5p-128", "v5p", 64, "v5:4x4x4", "megacore", (True,) * 3),
    ("v5p-512", "v5p", 256, "v5:4x8x8", "megacore", (True,) * 3),
    ("v5e-16", "v5e", 16, "v5e:4x4", "default", (False,) * 3),
    ("v5litepod-8", "v5e", 8, "v5e:2x4", "default", (False,) * 3),
    ("v5e-256", "v5e", 256, "v5e:16x16", "default", (True, True, False)),
    ("v6e-8", "v6e", 8, "v6e:2x4", "default", (False,) * 3),
    ("v6e-1", "v6e", 1, "v6e:1x1", "default", (False,) * 3),
    ("v4:4x4x12", "v4", 192, "v4:4x4x12", "megacore", (True,) * 3),
])
def test_tpu_names_map_to_chips_and_slice_shapes(name, chip, chips, tpu_topology, config, wrap):
    topo = topologies.parse_topology(name)
    assert (topo.chip.name, topo.num_chips, topo.tpu_topology, topo.chip.chip_config, topo.wrap) == \
        (chip, chips, tpu_topology, config, wrap)
    assert topo.chips_per_host_bounds == ((1, 1, 1) if chips == 1 else (2, 2, 1))


def test_chip_table_matches_the_vendor_data_sheets():
    t, g = topologies.TPU_CHIPS, topologies.GPU_CHIPS
    assert [(t[k].hbm_bytes / GiB, t[k].peak_flops) for k in ("v4", "v5p", "v5e", "v6e")] == \
        [(32, 275e12), (95, 459e12), (16, 197e12), (32, 918e12)]
    assert [(g[k].hbm_bytes / 1e9, g[k].peak_flops) for k in ("a100-40g", "a100-80g", "h100", "h200")] == \
        [(40, 312e12), (80, 312e12), (80, 989e12), (141, 989e12)]


@pytest.mark.parametrize("platform, kind, peak", [
    ("gpu", "NVIDIA H100 80GB HBM3", 989e12), ("gpu", "NVIDIA H200", 989e12), ("gpu", "NVIDIA A100-SXM4-40GB", 312e12),
    ("gpu", "NVIDIA A100-SXM4-80GB", 312e12), ("gpu", "Tesla T4", 0.0), ("tpu", "TPU v4", 275e12),
    ("tpu", "TPU v5 lite", 197e12), ("tpu", "TPU v6 lite", 918e12), ("tpu", "TPU v5", 459e12), ("tpu", "TPU v7x", 0.0),
    ("cpu", "cpu", 0.0),
])
def test_peak_flops_of_a_device_come_from_the_chip_table(platform, kind, peak):
    assert topologies.peak_flops(types.SimpleNamespace(platform=platform, device_kind=kind)) == peak


def test_model_flops_per_token_counts_matmul_params_and_attention():
    cfg = model_config("dolly-v2-3b")
    matmul = count_params(cfg) - cfg.padded_vocab_size * cfg.hidden_size  # embed_in is a lookup
    assert model_flops_per_token(cfg, 2048) == 6.0 * matmul + 12.0 * cfg.num_layers * cfg.hidden_size * 2048
    assert model_flops(cfg, 8, 2048) == 8 * 2048 * model_flops_per_token(cfg, 2048)  # the stand-in step's count


def test_slice_counts_and_gpu_shapes():
    two = topologies.parse_topology("v4-8", num_slices=2)
    assert (two.num_chips, two.num_slices, two.tpu_topology) == (8, 2, "v4:2x2x1")
    gpu = topologies.parse_topology("gpu:2x4", gpu_type="a100-40g")
    assert (gpu.platform, gpu.num_chips, gpu.num_slices, gpu.chip.name) == ("gpu", 8, 2, "a100-40g")
    assert topologies.parse_topology("gpu:1x8").chip.name == "h100"
    for chips in (8, 16, 32, 64, 128, 1024):
        shape = topologies.slice_shape(chips, 3)
        assert np.prod(shape) == chips and list(shape) == sorted(shape)


@pytest.mark.parametrize("name, kwargs, message", [
    ("v4-7", {}, "count TensorCores"),
    ("v4-12", {}, "give the slice shape explicitly as v4:AxBxC"),
    ("v5e-2", {}, "give the slice shape explicitly as v5e:AxB"),
    ("v5e-512", {}, "pod has 256"),
    ("v9-8", {}, "unknown topology"),
    ("v4:2x2", {}, "3-D"),
    ("gpu:8", {}, "gpu:NxM"),
    ("gpu:1x8", {"gpu_type": "b200"}, "unknown GPU type"),
    ("v4-8", {"gpu_type": "h100"}, "only applies to gpu"),
    ("v4-8", {"num_slices": 0}, "num_slices"),
])
def test_bad_topologies_say_what_to_change(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        topologies.parse_topology(name, **kwargs)


def test_too_few_cpu_devices_is_a_clear_error():
    with pytest.raises(topologies.TopologyUnavailable, match="needs 16 CPU devices but JAX has 8"):
        topologies.gpu_devices(topologies.parse_topology("gpu:2x8"))


# ---------------------------------------------------------------- the report's arithmetic

def _report(**kw):
    base = dict(topology="v4-16", description="d", target="t", chip="v4", num_chips=8, num_slices=1,
                mesh={"data": 1, "fsdp": 8, "tensor": 1}, hbm_bytes=32 * GiB, hbm_label="32 GiB",
                peak_flops_per_chip=275e12, tokens_per_step=8 * 2048, mfu=0.4, compile_seconds=1.0)
    return cc.CompileReport(**{**base, **kw})


def test_report_memory_speed_and_error_line():
    r = _report(argument_bytes=20 * GiB, output_bytes=20 * GiB, alias_bytes=19 * GiB, temp_bytes=int(20.2 * GiB),
                generated_code_bytes=0, peak_bytes=30 * GiB, xla_flops_per_chip=4e15, model_flops_per_step=3e16)
    assert r.total_bytes == r.needed_bytes == int(41.2 * GiB)
    assert not r.fits
    assert r.error_line().startswith("does not fit: needs 41.2 GiB per chip, v4 has 32 GiB HBM; ")
    assert r.xla_flops_per_step == 3.2e16
    assert r.step_seconds == pytest.approx(3e16 / (8 * 275e12 * 0.4))  # MFU counts model FLOPs
    assert r.tokens_per_second == pytest.approx(8 * 2048 / r.step_seconds)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["fits"] is False and d["needed_bytes"] == int(41.2 * GiB) and d["mesh"]["fsdp"] == 8
    text = r.format()
    assert "DOES NOT FIT" in text and "XLA / model = 1.07" in text and "tokens/s" in text

    ok = _report(argument_bytes=GiB, output_bytes=GiB, alias_bytes=GiB, temp_bytes=GiB, generated_code_bytes=0,
                 xla_flops_per_chip=1e12)
    assert ok.fits and ok.error_line() == "" and ok.needed_bytes == 2 * GiB
    assert ok.step_seconds == pytest.approx(8e12 / (8 * 275e12 * 0.4))  # no model FLOPs: XLA's count
    assert "=> fits" in ok.format() and "XLA FLOPs (no model FLOPs given)" in ok.format()


@pytest.mark.parametrize("message, gib", [
    ("Ran out of memory on HBM, the total memory required for HLO temporaries (203.26G) exceeds available "
     "HBM (15.75G).", 203.26),
    ("Ran out of memory in memory space hbm. Used 20.50G of 15.48G hbm. Exceeded hbm capacity by 5.02G.", 20.5),
])
def test_out_of_memory_messages_are_read(message, gib):
    assert cc._oom_bytes(message) == int(gib * GiB)
    r = _report(chip="v5e", hbm_bytes=16 * GiB, hbm_label="16 GiB", oom_message=message,
                oom_needed_bytes=cc._oom_bytes(message))
    assert not r.fits and f"needs {gib:.1f} GiB per chip, v5e has 16 GiB HBM (XLA: " in r.error_line()


# ---------------------------------------------------------------- real compiles

def test_gpu_shape_check_on_cpu_devices():
    cfg = model_config("tiny")
    step = StandInStep(cfg, batch=16, length=64)
    flops = model_flops(cfg, 16, 64)
    r = cc.compile_check(step, "gpu:2x4", gpu_type="a100-40g", tokens_per_step=16 * 64, model_flops_per_step=flops)
    print(r.format())
    assert r.fits and r.chip == "a100-40g" and "CPU stand-ins" in r.target
    assert r.mesh == {"data": 2, "fsdp": 4, "tensor": 1}  # hosts default to the data axis
    assert not r.step_has_loops  # the tiny config does not scan its layers
    assert r.argument_bytes == step.argument_bytes_per_device()
    assert 0 < r.needed_bytes < 64 * 2**20
    assert 0.7 < r.xla_flops_per_step / flops < 1.5
    assert r.step_seconds == pytest.approx(flops / (8 * 312e12 * 0.4))


@needs_libtpu
def test_tpu_v4_16_compiles_on_cpu_and_fits():
    cfg = model_config("tiny")
    step = StandInStep(cfg, batch=16, length=64)
    flops = model_flops(cfg, 16, 64)
    r = cc.compile_check(step, "v4-16", tokens_per_step=16 * 64, model_flops_per_step=flops, mfu=0.5)
    print(r.format())
    assert r.fits and r.error_line() == ""
    assert (r.num_chips, r.chip, r.mesh) == (8, "v4", {"data": 1, "fsdp": 8, "tensor": 1})
    assert "libtpu" in r.target and "16 TensorCores" in r.description
    # TPU layouts pad minor dims to tiles (the tiny model's 64-wide dims to 128)
    assert step.argument_bytes_per_device() <= r.argument_bytes <= 3 * step.argument_bytes_per_device()
    assert r.temp_bytes > 0 and r.needed_bytes < 64 * 2**20
    assert 0.7 < r.xla_flops_per_step / flops < 1.5
    assert r.tokens_per_second == pytest.approx(16 * 64 * 8 * 275e12 * 0.5 / flops)


@needs_libtpu
def test_pythia_12b_without_fsdp_does_not_fit_a_v5e_4():
    # xla attention: splash's mask tables would add a few KiB of constant arguments to the exact count below
    cfg = model_config("pythia-12b").replace(attention="xla")
    step = StandInStep(cfg, batch=4, length=2048)
    r = cc.compile_check(step, "v5e-4", mesh_shape="4,1,1", tokens_per_step=4 * 2048,
                         model_flops_per_step=model_flops(cfg, 4, 2048))
    print(r.format())
    print(r.error_line())
    assert not r.fits
    # every chip holds the whole fp32 model and both Adam moments: 12 bytes per parameter
    assert r.argument_bytes == step.argument_bytes_per_device() > 12 * 11e9
    assert r.needed_bytes >= r.argument_bytes
    assert r.error_line().startswith(f"does not fit: needs {r.needed_bytes / GiB:.1f} GiB per chip, v5e has 16 GiB HBM")
    assert r.step_seconds is not None  # the estimate still comes from model FLOPs


@needs_libtpu
@pytest.mark.parametrize("name, kind", [("v5p-8", "TPU v5"), ("v5e-4", "TPU v5 lite"), ("v6e-8", "TPU v6 lite")])
def test_each_generation_makes_compile_only_devices(name, kind):
    topo = topologies.parse_topology(name)
    devices = topologies.tpu_devices(topo)
    assert len(devices) == topo.num_chips and devices[0].device_kind == kind
    assert cc.topology_mesh(devices, None).shape == {"data": 1, "fsdp": topo.num_chips, "tensor": 1}


@needs_libtpu
def test_multislice_mesh_puts_slices_on_the_data_axis():
    topo = topologies.parse_topology("v4-8", num_slices=2)
    devices = topologies.tpu_devices(topo)
    mesh = cc.topology_mesh(devices, "-1,2,2", num_slices=2)
    assert mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
    slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (slice_of == np.arange(2)[:, None, None]).all()
    with pytest.raises(ValueError, match="multiple of the slice count"):
        cc.topology_mesh(devices, "1,8,1", num_slices=2)


@needs_libtpu
def test_tiny_lm_step_compiles_for_two_v5p_slices():
    """The trainer's own step (lm.lower_train_step) on 2 x v5p-8 over the mesh training builds
    (sharding.make_mesh with num_slices=2): slices along 'data', each a whole fsdp block."""
    config = configs.load_config(STAGE1 + ":tiny", ["--config.train.mesh=2,-1,1", "--config.train.num_slices=2"])
    tokens, flops = lm.step_flops(config)
    meshes = []

    def lower(mesh):
        meshes.append(mesh)
        return lm.lower_train_step(config, mesh)

    r = cc.compile_check(lower, "v5p-8", num_slices=config.train.num_slices, mesh_shape=config.train.mesh,
                         tokens_per_step=tokens, model_flops_per_step=flops)
    print(r.format())
    assert r.fits and (r.num_chips, r.num_slices, r.mesh) == (8, 2, {"data": 2, "fsdp": 4, "tensor": 1})
    assert "2 slices" in r.description and r.argument_bytes > 0
    slice_of = np.vectorize(lambda d: d.slice_index)(meshes[0].devices)
    assert (slice_of == np.arange(2)[:, None, None]).all()  # data row i = slice i: only 'data' crosses DCN
    with pytest.raises(ValueError, match=r"data axis \(1\) must be a multiple of the slice count"):
        cc.compile_check(lower, "v5p-8", num_slices=2, mesh_shape="1,-1,1", tokens_per_step=tokens)
    with pytest.raises(ValueError, match="span 2 TPU slices but train.num_slices is 1"):
        sharding.make_mesh("2,-1,1", devices=list(meshes[0].devices.ravel()))


def test_missing_libtpu_says_how_to_install_it(monkeypatch):
    from jax.experimental import topologies as jax_topologies

    def no_tpu(*args, **kwargs):  # what jax raises when libtpu is absent
        raise RuntimeError("JAX TPU support not installed; cannot generate TPU topology. See ...")

    monkeypatch.setattr(jax_topologies, "get_topology_desc", no_tpu)
    with pytest.raises(topologies.TopologyUnavailable, match=r"needs libtpu: pip install 'llmcxr-jax\[tpu\]'"):
        cc.compile_check(lambda mesh: None, "v4-16", tokens_per_step=1)


@pytest.mark.parametrize("kwargs, message", [({"tokens_per_step": 0}, "tokens_per_step"),
                                             ({"tokens_per_step": 8, "mfu": 1.5}, "mfu")])
def test_bad_speed_inputs_are_refused_before_compiling(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cc.compile_check(lambda mesh: pytest.fail("lowered despite bad inputs"), "gpu:1x8", **kwargs)


def test_loops_in_the_step_are_flagged():
    def lower(mesh):
        x = jax.ShapeDtypeStruct((8, 128), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))

        def layers(x):  # four "layers" of x @ x.T @ x, scanned like scan_layers
            return jax.lax.scan(lambda h, _: (jnp.tanh(h @ h.T @ h), None), x, None, length=4)[0]

        return jax.jit(layers).lower(x)

    r = cc.compile_check(lower, "gpu:1x2", tokens_per_step=8)
    assert r.step_has_loops and "lower bound" in r.format()
    assert r.fits and r.argument_bytes == 4 * 128 * 4  # each of 2 devices holds 4 rows


# ---------------------------------------------------------------- XLA's cost model and comparing settings

def test_cost_model_line_says_what_it_leaves_out():
    r = _report(argument_bytes=GiB, output_bytes=GiB, alias_bytes=GiB, temp_bytes=GiB, generated_code_bytes=0,
                xla_optimal_seconds=0.25, custom_kernels=("Pallas/Mosaic (e.g. splash attention) x64",),
                step_has_loops=True)
    line = next(x for x in r.format().splitlines() if "XLA cost model" in x)
    assert "step 250 ms (optimal_seconds); a lower bound: custom kernels it does not cost: Pallas/Mosaic" in line
    assert line.endswith("x64; loop bodies counted once")
    assert "XLA cost model" not in _report().format()  # no estimate, no line
    assert _report(xla_optimal_seconds=1.0).cost_caveat() == ""


def test_custom_kernels_are_counted_by_target():
    hlo = ('%a = custom-call(%x), custom_call_target="tpu_custom_call", backend_config="..."\n'
           '%b = custom-call(%y), custom_call_target="tpu_custom_call"\n'
           '%c = custom-call(%z), custom_call_target="__cudnn$fmha"\n'
           '%d = custom-call(%w), custom_call_target="SliceToDynamic"\n')
    compiled = types.SimpleNamespace(as_text=lambda: hlo)
    assert cc.custom_kernels(compiled) == ("Pallas/Mosaic (e.g. splash attention) x2", "cuDNN attention x1")
    plain = jax.jit(lambda x: x * 2).lower(np.ones(4, np.float32)).compile()
    assert cc.custom_kernels(plain) == ()


def test_variant_grid_and_table():
    grid = cc.variant_grid(["model.attention=xla,splash", "train.logits_chunk=0,512"])
    assert grid == [["model.attention=xla", "train.logits_chunk=0"], ["model.attention=xla", "train.logits_chunk=512"],
                    ["model.attention=splash", "train.logits_chunk=0"],
                    ["model.attention=splash", "train.logits_chunk=512"]]
    assert cc.variant_grid([]) == [[]]
    for bad in ("model.attention", "=xla", "model.attention="):
        with pytest.raises(ValueError, match="is not KEY=V1,V2"):
            cc.variant_grid([bad])
    big = _report(argument_bytes=GiB, output_bytes=GiB, alias_bytes=GiB, temp_bytes=40 * GiB, generated_code_bytes=0,
                  model_flops_per_step=3e16, xla_optimal_seconds=0.5)
    small = _report(argument_bytes=GiB, output_bytes=GiB, alias_bytes=GiB, temp_bytes=7 * GiB, generated_code_bytes=0)
    rows = cc.comparison_table([(grid[0], big), (grid[3], small)]).splitlines()
    assert rows[2] == "| model.attention=xla train.logits_chunk=0 | 41.0 GiB | 128% | no | 500 ms | 34.1 s |"
    assert rows[3] == "| model.attention=splash train.logits_chunk=512 | 8.0 GiB | 25% | yes | - | - |"


@needs_libtpu
def test_splash_step_reports_its_kernels_and_the_cost_model(capsys):
    from llmcxr_jax import cli

    stage1 = os.path.join(os.path.dirname(__file__), "..", "configs", "llmcxr_stage1.py")
    code = cli.main(["compile-check", "--config", f"{stage1}:tiny", "--topology", "v5p-8",
                     "--compare", "model.attention=xla,splash"])
    out, err = capsys.readouterr()
    assert code == 0, err
    xla, splash = json.loads(out.strip().splitlines()[-1])
    assert xla["overrides"] == ["model.attention=xla"] and xla["custom_kernels"] == []
    assert splash["custom_kernels"] == ["Pallas/Mosaic (e.g. splash attention) x4"]  # 2 layers, forward + backward
    assert xla["xla_optimal_seconds"] > 0 and splash["xla_optimal_seconds"] > 0
    assert "| model.attention=splash | " in err
