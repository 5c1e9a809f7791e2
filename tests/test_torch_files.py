"""One safe reader for every torch file: a Lightning 1.x checkpoint whose callbacks, hyper-parameters and
optimizer hold classes of packages that are not installed imports with its exact generator weights
(import-vqgan and train.init_from); what torch.load(weights_only=True) reads, we read to the bit, in both
of torch.save's formats; and a file whose pickle would run code is refused by name without running it."""
import builtins
import collections
import functools
import importlib
import os
import pathlib
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from llmcxr_jax import checkpoint, cli, configs, safe_pickle, sharding
from llmcxr_jax.convert import taming_vqgan, torch_files
from llmcxr_jax.errors import UsageError
from llmcxr_jax.models import discriminator as disc_lib
from llmcxr_jax.models.discriminator import DiscriminatorConfig
from llmcxr_jax.models.vqgan import VQGANConfig, init_vqgan

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "vqgan_f16_1024.py")

# Stand-ins for pytorch_lightning / omegaconf, as a checkpoint holds them. Importing the module leaves
# a marker file, and every method that unpickling would call on the real classes leaves another.
FAKE_LIGHTNING = '''
import enum, os
MARKER = {marker!r}
open(MARKER + ".imported", "w").close()

def _ran(what):
    open(MARKER + "." + what, "w").close()

class ModelCheckpoint:
    def __init__(self):
        self.monitor, self.save_top_k = "val/rec_loss", 3
    def __setstate__(self, state):
        _ran("setstate")

class AttributeDict(dict):
    def __setitem__(self, key, value):
        _ran("setitem")
        super().__setitem__(key, value)

class ContainerMetadata:
    def __init__(self, ref_type, object_type):
        self.ref_type, self.object_type = ref_type, object_type

class DictConfig:
    def __init__(self, content):
        self._content = dict(content)
        self._metadata = ContainerMetadata(object, dict)
    def __getstate__(self):
        return {{"_content": self._content, "_metadata": self._metadata, "_parent": None}}
    def __setstate__(self, state):
        _ran("setstate")
    def __new__(cls, *args):
        if not args:
            _ran("new")
        return super().__new__(cls)

class TrainerFn(enum.Enum):
    FITTING = "fit"

def run_at_load():
    _ran("called")
'''


@pytest.fixture
def absent_module(tmp_path):
    """make(name) -> a module written to tmp and imported, for pickling; gone(name) takes it out of
    sys.modules and sys.path again, so that the reader cannot find it."""
    folder = tmp_path / "absent_modules"
    folder.mkdir()
    marker = str(tmp_path / "ran")
    names = []

    def make(name):
        (folder / f"{name}.py").write_text(FAKE_LIGHTNING.format(marker=marker))
        sys.path.insert(0, str(folder))
        importlib.invalidate_caches()
        names.append(name)
        module = importlib.import_module(name)
        os.remove(marker + ".imported")
        return module

    def gone(name):
        sys.modules.pop(name, None)
        if str(folder) in sys.path:
            sys.path.remove(str(folder))
        importlib.invalidate_caches()
        assert importlib.util.find_spec(name) is None

    yield make, gone, marker
    for name in names:
        gone(name)


def ran(marker: str) -> list[str]:
    folder, stem = os.path.split(marker)
    return sorted(n for n in os.listdir(folder) if n.startswith(os.path.basename(stem) + "."))


def small_train_config():
    """test_vqgan_train's two-level 16 px VQ-GAN, whose discriminator rides in the checkpoint."""
    cfg = configs.load_config(f"{CONFIG}:tiny")
    for key, value in {"model.resolution": 16, "model.ch_mult": (1, 2), "model.attn_resolutions": (8,),
                       "discriminator.n_layers": 1}.items():
        section, name = key.split(".")
        cfg[section][name] = value
    return cfg


def lightning_checkpoint(fake, gen_sd: dict[str, np.ndarray], loss_sd: dict[str, np.ndarray]) -> dict:
    """What Lightning 1.x's dump_checkpoint writes for taming's VQModel, with a real Adam state."""
    state_dict = collections.OrderedDict((k, torch.from_numpy(v.copy())) for k, v in {**gen_sd, **loss_sd}.items())
    params = [torch.nn.Parameter(torch.from_numpy(v.copy())) for v in list(gen_sd.values())[:3]]
    opt = torch.optim.Adam(params, lr=4.5e-6, betas=(0.5, 0.9))
    sum((p * p).sum() for p in params).backward()
    opt.step()
    hparams = fake.DictConfig({"embed_dim": 32, "n_embed": 64, "ddconfig": {"ch": 32}})
    attrs = fake.AttributeDict(lr=4.5e-6)
    return {"epoch": 41, "global_step": 590000, "pytorch-lightning_version": "1.4.2", "state_dict": state_dict,
            "callbacks": {fake.ModelCheckpoint: {"best_model_score": torch.tensor(0.25), "best_model_path": "x.ckpt",
                                                 "instance": fake.ModelCheckpoint()}},
            "optimizer_states": [opt.state_dict()], "lr_schedulers": [], "hparams_name": "kwargs",
            "hyper_parameters": hparams, "trainer_fn": fake.TrainerFn.FITTING, "attrs": attrs}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_lightning_checkpoint_of_absent_packages_imports_exact_weights(absent_module, tmp_path, capsys, legacy):
    make, gone, marker = absent_module
    fake = make("fake_lightning_a")
    cfg = small_train_config()
    gen = init_vqgan(VQGANConfig(**cfg.model), seed=3)
    disc = disc_lib.init_discriminator(DiscriminatorConfig(**cfg.discriminator), seed=4)
    gen_sd = taming_vqgan.to_taming_state_dict(gen)
    loss_sd = {k: np.asarray(v, np.float32) for k, v in disc_lib.to_taming_state_dict(disc).items()}
    ck = lightning_checkpoint(fake, gen_sd, loss_sd)
    path = str(tmp_path / "last.ckpt")
    torch.save(ck, path, _use_new_zipfile_serialization=not legacy)
    adam = ck["optimizer_states"][0]
    gone("fake_lightning_a")

    whole = torch_files.read_torch_file(path, "taming checkpoint")
    assert "fake_lightning_a" not in sys.modules and not ran(marker)  # never imported, nothing of it ran
    ((key, callback),) = whole["callbacks"].items()
    assert isinstance(key, safe_pickle.StandInType) and key.pickle_global == "fake_lightning_a.ModelCheckpoint"
    assert callback["best_model_score"].item() == 0.25 and callback["instance"].state == {
        "monitor": "val/rec_loss", "save_top_k": 3}
    hp = whole["hyper_parameters"]
    assert type(hp).pickle_global == "fake_lightning_a.DictConfig" and hp.state["_content"]["ddconfig"] == {"ch": 32}
    assert hp.state["_metadata"].state == {"ref_type": object, "object_type": dict}
    assert whole["attrs"].items == {"lr": 4.5e-6} and whole["trainer_fn"].args == ("fit",)
    back = whole["optimizer_states"][0]
    assert back["param_groups"] == adam["param_groups"]
    for i, state in adam["state"].items():
        for name, value in state.items():
            assert torch.equal(back["state"][i][name], value), (i, name)

    sd = taming_vqgan.read_ckpt(path)
    assert sorted(sd) == sorted({**gen_sd, **loss_sd})
    for k, v in {**gen_sd, **loss_sd}.items():
        np.testing.assert_array_equal(sd[k], v)

    out = str(tmp_path / "imported")
    assert cli.main(["import-vqgan", "--taming", path, "--out", out, "--resolution", "16"]) == 0, capsys.readouterr()
    model, _ = checkpoint.load_vqgan(out, sharding.make_mesh("-1,1,1"))
    for k, v in taming_vqgan.to_taming_state_dict(model).items():
        np.testing.assert_array_equal(v, gen_sd[k])
    assert not ran(marker)


def test_train_init_from_reads_a_lightning_checkpoint(absent_module, tmp_path):
    """train-vqgan's train.init_from (the paper's ImageNet start) takes the same file: generator and
    discriminator come out as written."""
    from llmcxr_jax.train import vqgan as train_vqgan

    make, gone, marker = absent_module
    fake = make("fake_lightning_b")
    cfg = small_train_config()
    gen = init_vqgan(VQGANConfig(**cfg.model), seed=5)
    disc = disc_lib.init_discriminator(DiscriminatorConfig(**cfg.discriminator), seed=6)
    loss_sd = {k: np.asarray(v, np.float32) for k, v in disc_lib.to_taming_state_dict(disc).items()}
    path = str(tmp_path / "imagenet_last.ckpt")
    torch.save(lightning_checkpoint(fake, taming_vqgan.to_taming_state_dict(gen), loss_sd), path)
    gone("fake_lightning_b")
    cfg.train.init_from = path
    weights = train_vqgan.initial_weights(cfg, sharding.make_mesh("-1,1,1"))
    jax.tree.map(np.testing.assert_array_equal, weights["gen"], nnx.state(gen, nnx.Param).to_pure_dict())
    _, disc_params, _ = nnx.split(disc, nnx.Param, nnx.BatchStat)
    jax.tree.map(np.testing.assert_array_equal, weights["disc"], disc_params.to_pure_dict())
    assert not ran(marker)


def test_an_importable_module_is_still_never_imported(absent_module, tmp_path):
    """The stand-ins do not depend on the module being absent: present on sys.path, it is not imported."""
    make, _, marker = absent_module
    fake = make("fake_lightning_c")
    path = str(tmp_path / "c.ckpt")
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": fake.DictConfig({"a": 1})}, path)
    sys.modules.pop("fake_lightning_c")
    assert list(taming_vqgan.read_ckpt(path)) == ["w"]
    assert "fake_lightning_c" not in sys.modules and not ran(marker)


def _sample_tensors() -> dict:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    shared = torch.arange(10, dtype=torch.int64)
    return {
        "f64": torch.linspace(-1, 1, 7, dtype=torch.float64), "f16": torch.tensor([0.5, -2.0], dtype=torch.float16),
        "bf16": torch.tensor([1.5, 3.0, -0.25], dtype=torch.bfloat16), "i8": torch.tensor([-128, 7], dtype=torch.int8),
        "u8": torch.tensor([255, 0], dtype=torch.uint8), "u16": torch.tensor([65535, 2], dtype=torch.uint16),
        "bool": torch.tensor([True, False]), "c64": torch.tensor([1 + 2j, -3j], dtype=torch.complex64),
        "conj": torch.tensor([1 + 2j, -3j], dtype=torch.complex64).conj(),  # a view carrying the conj bit
        "transposed": base.t(), "column": base[:, 2], "scalar": torch.tensor(3.5),
        "shared_a": shared[2:5], "shared_b": shared[4:], "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.full((2, 2), 0.125)),
    }


@pytest.mark.parametrize("fmt", ["zip", "zip-mmap", "legacy"])
def test_reads_what_torch_load_weights_only_reads(tmp_path, fmt):
    path = str(tmp_path / "t.pt")
    tensors = _sample_tensors()
    if fmt == "legacy":  # torch.load itself cannot read an untyped (uint16) storage from the legacy stream
        tensors.pop("u16")
    torch.save({"tensors": tensors, "od": collections.OrderedDict(a=1), "set": {1, 2}, "bytes": b"\x00\xff",
                "nested": [(1, 2.5, "x", None, True)]}, path,
               _use_new_zipfile_serialization=fmt != "legacy")
    want = torch.load(path, weights_only=True)
    got = torch_files.read_torch_file(path, mmap=fmt == "zip-mmap")
    assert set(got["tensors"]) == set(want["tensors"])
    for k, t in want["tensors"].items():
        g = got["tensors"][k]
        assert type(g) is torch.Tensor and g.dtype == t.dtype and g.shape == t.shape and not g.requires_grad, k
        assert g.is_conj() == t.is_conj() and torch.equal(g.resolve_conj(), t.detach().resolve_conj()), k
    assert {k: v for k, v in got.items() if k != "tensors"} == {k: v for k, v in want.items() if k != "tensors"}
    got["tensors"]["shared_a"][2] = -1  # the two views still share their storage, as saved
    assert got["tensors"]["shared_b"][0].item() == -1


class Calls:
    """A pickle that calls fn(*args) on load, the way a malicious __reduce__ does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker: str):
    """(what it calls, the global the refusal must name) for calls that would touch `marker`."""
    touch = ["touch", marker]
    return [
        (Calls(os.system, f"touch {marker}"), f"{os.system.__module__}.system"),
        (Calls(builtins.eval, f"open({marker!r}, 'w')"), "builtins.eval"),
        (Calls(builtins.exec, f"open({marker!r}, 'w')"), "builtins.exec"),
        (Calls(subprocess.call, touch), "subprocess.call"),
        (Calls(subprocess.Popen, touch), "subprocess.Popen"),
        (Calls(functools.partial(os.system, f"touch {marker}")), "functools.partial"),
        (Calls(builtins.getattr, pathlib.Path(marker), "touch"), "builtins.getattr"),
        (Calls(builtins.__import__, "os"), "builtins.__import__"),
        (Calls(pathlib.Path.touch, pathlib.Path(marker)), "pathlib.Path.touch"),  # a method: a call, not a class
        (Calls(torch.save, {}, marker), "torch.serialization.save"),  # torch's own functions other than rebuilds
    ]


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_checkpoint_whose_pickle_calls_code_is_refused_by_name(tmp_path, capsys, legacy):
    marker = str(tmp_path / "SIDE_EFFECT")
    for n, (payload, name) in enumerate(_payloads(marker)):
        path = str(tmp_path / f"evil{n}.ckpt")
        nested = {"state_dict": {"w": torch.ones(2)}, "callbacks": {"cb": [{"deep": payload}]}}
        torch.save(nested, path, _use_new_zipfile_serialization=not legacy, pickle_protocol=4)
        assert cli.main(["import-vqgan", "--taming", path, "--out", str(tmp_path / f"o{n}")]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"refusing {name}:" in err and path in err and "nothing in the file was run" in err
        with pytest.raises(UsageError, match=f"refusing {name}:"):
            torch_files.read_torch_state_dict(path)
        assert not os.path.exists(tmp_path / f"o{n}")
    assert not os.path.exists(marker)


def test_a_codes_pickle_that_calls_code_is_refused_by_name(tmp_path, capsys):
    marker = str(tmp_path / "SIDE_EFFECT")
    for n, (payload, name) in enumerate(_payloads(marker)):
        for protocol in (0, 2, 4):
            # protocols < 4 write a method as getattr(class, name)
            want = "builtins.getattr" if protocol < 4 and name == "pathlib.Path.touch" else name
            pkl = tmp_path / f"evil{n}-{protocol}.pkl"
            pkl.write_bytes(pickle.dumps({"a": [1] * 256, "b": payload}, protocol=protocol))
            assert cli.main(["import-codes", "--pickle", str(pkl), "--out", str(tmp_path / f"c{n}")]) == 2
            err = capsys.readouterr().err.strip()
            assert "\n" not in err and f"refusing {want}:" in err and "not a safe LLM-CXR codes pickle" in err, err
    assert not os.path.exists(marker)


def test_function_calls_of_other_modules_are_refused_and_classes_kept_inert(absent_module, tmp_path):
    make, gone, marker = absent_module
    fake = make("fake_lightning_d")
    path = str(tmp_path / "d.ckpt")
    torch.save({"state_dict": {"w": torch.ones(1)}, "cb": Calls(fake.run_at_load)}, path)
    gone("fake_lightning_d")
    with pytest.raises(UsageError, match=r"refusing fake_lightning_d.run_at_load: the file calls it while loading"):
        torch_files.read_torch_file(path)
    assert not ran(marker)


def test_allowlisted_callables_check_their_arguments_and_cannot_be_rewritten(tmp_path):
    for payload, message in [(Calls(bytes, 10 ** 12), "builtins.bytes called with"),  # not a 1 TB allocation
                             (Calls(bytearray, 10 ** 12), "builtins.bytearray called with"),
                             (Calls(collections.defaultdict, bytes), "collections.defaultdict called with"),
                             (Calls(type, "X", (object,), {}), "builtins.type called with")]:
        with pytest.raises(pickle.UnpicklingError, match=message):
            safe_pickle.load(_bytes_io(pickle.dumps(payload, protocol=2)))
    data = {"none": type(None), "dd": collections.defaultdict(list, a=[1]), "ba": bytearray(b"\x01"), "c": 1 + 2j,
            "fs": frozenset({3}), "counter": collections.Counter("aab")}
    for protocol in (0, 2, 5):  # the same data through each protocol's spelling of it
        assert safe_pickle.load(_bytes_io(pickle.dumps(data, protocol=protocol))) == data
    with pytest.raises(TypeError, match="not callable"):  # numpy.ndarray((n, n)) would be uninitialised memory
        safe_pickle.load(_bytes_io(pickle.dumps(Calls(np.ndarray, (10 ** 5, 10 ** 5)), protocol=2)),
                         allowed={**safe_pickle.DATA_GLOBALS, **safe_pickle.numpy_globals()})
    # BUILD aimed at an allowlisted function (to set its __defaults__) instead of at an object
    build = b"\x80\x02c_codecs\nencode\nN}X\x0c\x00\x00\x00__defaults__)s\x86b."
    with pytest.raises(pickle.UnpicklingError, match="cannot BUILD"):
        safe_pickle.load(_bytes_io(build))
    # a tensor that claims more elements than its storage holds is refused, not read out of bounds
    path = str(tmp_path / "oob.pt")
    storage = torch.ones(2).untyped_storage()
    torch.save({"t": Calls(torch._utils._rebuild_tensor_v2, storage, 0, (1000,), (1,), False,
                           collections.OrderedDict())}, path)
    with pytest.raises(UsageError, match=r"size \(1000,\) reaches past its 8-byte storage"):
        torch_files.read_torch_file(path)


def _bytes_io(data: bytes):
    import io

    return io.BytesIO(data)


def test_other_torch_files_are_refused_in_one_line(tmp_path):
    script = str(tmp_path / "script.pt")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), script)
    with pytest.raises(UsageError, match="TorchScript archive"):
        torch_files.read_torch_state_dict(script)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"w": np.ones(2)}))
    with pytest.raises(UsageError, match="neither torch.save's zip archive nor its legacy stream"):
        torch_files.read_torch_state_dict(str(plain))
    sparse = str(tmp_path / "sparse.pt")
    torch.save({"s": torch.eye(2).to_sparse()}, sparse)
    with pytest.raises(UsageError, match="holds a sparse tensor, which this reader does not rebuild"):
        torch_files.read_torch_file(sparse)


def test_a_converter_without_torch_names_the_interop_extra(tmp_path, monkeypatch, capsys):
    from llmcxr_jax.convert import torch_reload

    path = str(tmp_path / "v.ckpt")
    torch.save({"state_dict": {"w": torch.ones(1)}}, path)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails as if it were not installed
    assert cli.main(["import-vqgan", "--taming", path, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "needs PyTorch" in err and "pip install 'llmcxr-jax[interop]'" in err
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(UsageError, match=r"needs diffusers, which is not installed; install it with pip install "
                                         r"'llmcxr-jax\[interop\]'"):
        torch_reload.diffusers_decode(str(tmp_path), np.zeros((1, 4), np.int64))
