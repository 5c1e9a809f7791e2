"""PyTorch weights of the frozen perceptual networks -> our arrays -> one safetensors file:
torchvision VGG16 + lpips lin heads (or the LPIPS inside a taming .ckpt), torchxrayvision's
DenseNet-121 features, and its whole classifier (head and op_threshs kept) for evaluation.
torch files are read by convert/torch_files.py: nothing in them is executed.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmcxr_jax import safe_pickle, user_files
from llmcxr_jax.convert.torch_files import read_torch_file, read_torch_state_dict, require_torch
from llmcxr_jax.errors import MissingInputError, UsageError
from llmcxr_jax.models.perceptual import (
    _HWIO_TO_OIHW,
    _OIHW_TO_HWIO,
    LPIPS,
    TAMING_LPIPS_PREFIX,
    DenseNet,
    DenseNetConfig,
    LPIPSConfig,
    txv_densenet121,
)
from llmcxr_jax.models.txv_classifier import (
    RELEASED_OP_THRESHS,
    TXV_PATHOLOGIES,
    Buffer,
    DenseNetClassifier,
    released_weights,
)

# ---------------------------------------------------------------------------------------------
# weights: torch state dicts <-> our arrays ("features.0.kernel", "denseblock1.denselayer1.norm1.scale")

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias", "running_mean": "running_mean",
                  "running_var": "running_var"}


def _flat_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    state = nnx.state(model, (nnx.Param, nnx.BatchStat, Buffer))
    return {".".join(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}


def _shapes(make: Callable[[], nnx.Module]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.get_value().shape) for k, v in _flat_variables(nnx.eval_shape(make)).items()}


def _lpips_source(key: str) -> tuple[str, str]:
    """Our LPIPS key -> (which torch state dict, its key there)."""
    head, leaf = key.rsplit(".", 1)
    if head.startswith("lin"):
        return "lin", f"{head}.model.1.weight"
    return "vgg16", f"{head}.{_LEAF_TO_TORCH[leaf]}"


def _txv_key(key: str) -> str:
    head, leaf = key.rsplit(".", 1)
    return f"features.{head}.{_LEAF_TO_TORCH[leaf]}"


def _from_torch(shapes: Mapping[str, tuple], torch_key: Callable[[str], str], sd: Mapping[str, Any],
                what: str) -> dict[str, np.ndarray]:
    out = {}
    for key, shape in shapes.items():
        tk = torch_key(key)
        if tk not in sd:
            raise UsageError(f"{what} lacks {tk!r}")
        value = np.asarray(sd[tk], dtype=np.float32)
        kernel = key.endswith(".kernel")
        want = tuple(shape[i] for i in _HWIO_TO_OIHW) if kernel else shape
        if value.shape != want:
            raise UsageError(f"{what} {tk!r} has shape {value.shape}, expected {want}")
        out[key] = np.ascontiguousarray(value.transpose(_OIHW_TO_HWIO) if kernel else value)
    return out


def _refuse_unexpected(sd: Mapping[str, Any], expected: set[str], scope: Callable[[str], bool], what: str) -> None:
    extra = sorted(k for k in sd if scope(k) and k not in expected)
    if extra:
        raise UsageError(f"{what} has unexpected {extra[0]!r} ({len(extra)} unexpected); is it the right network?")


def _to_torch(arrays: Mapping[str, np.ndarray], torch_key: Callable[[str], str]) -> dict[str, np.ndarray]:
    return {torch_key(k): np.ascontiguousarray(np.transpose(v, _HWIO_TO_OIHW) if k.endswith(".kernel") else v)
            for k, v in arrays.items()}


def _lpips_shapes() -> dict[str, tuple[int, ...]]:
    return _shapes(lambda: LPIPS(LPIPSConfig(dtype="float32", param_dtype="float32"), rngs=None))


def _txv_shapes() -> dict[str, tuple[int, ...]]:
    return _shapes(lambda: DenseNet(txv_densenet121(dtype="float32", param_dtype="float32"), rngs=None))


def convert_lpips(vgg16_state_dict: Mapping[str, Any], lin_state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """torchvision vgg16 state dict (features.N.weight/bias; classifier.* ignored) + lpips'
    weights/v0.1/vgg.pth (linK.model.1.weight) -> our float32 arrays. ValueError names a missing,
    unexpected or misshapen key."""
    shapes = _lpips_shapes()
    out = {}
    for which, sd, what, scope in (("vgg16", vgg16_state_dict, "vgg16 state dict", lambda k: k.startswith("features.")),
                                   ("lin", lin_state_dict, "LPIPS lin state dict", lambda k: k.startswith("lin"))):
        part = {k: s for k, s in shapes.items() if _lpips_source(k)[0] == which}
        source = lambda k: _lpips_source(k)[1]  # noqa: E731
        _refuse_unexpected(sd, {source(k) for k in part}, scope, what)
        out.update(_from_torch(part, source, sd, what))
    return out


def lpips_torch_state_dicts(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Inverse of convert_lpips: (vgg16 `features.*` state dict, lpips lin state dict)."""
    torch_sd = _to_torch(arrays, lambda k: _lpips_source(k)[1])
    lin = {k: v for k, v in torch_sd.items() if k.startswith("lin")}
    return {k: v for k, v in torch_sd.items() if k not in lin}, lin


def split_taming_lpips(state_dict: Mapping[str, Any], prefix: str = TAMING_LPIPS_PREFIX
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
    """A taming / LLM-CXR VQ-GAN state dict, which carries its LPIPS under `prefix`
    (net.sliceS.N.weight, linK.model.1.weight) -> (vgg16 state dict, lin state dict) for convert_lpips."""
    vgg, lin = {}, {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):].split(".")
        if rest[0] == "net" and len(rest) == 4:  # net.slice1.0.weight: torchvision index kept
            vgg[f"features.{rest[2]}.{rest[3]}"] = value
        elif rest[0].startswith("lin"):
            lin[".".join(rest)] = value
    if not vgg or not lin:
        raise UsageError(f"state dict has no LPIPS network and lin heads under {prefix!r}")
    return vgg, lin


def convert_txv_densenet(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """torchxrayvision DenseNet-121 state dict -> our float32 arrays. Only features.* is used
    (classifier.*, op_threshs and num_batches_tracked are ignored); ValueError names a missing,
    unexpected or misshapen key."""
    shapes = _txv_shapes()
    what = "torchxrayvision DenseNet state dict"
    _refuse_unexpected(state_dict, {_txv_key(k) for k in shapes},
                       lambda k: k.startswith("features.") and not k.endswith(".num_batches_tracked"), what)
    return _from_torch(shapes, _txv_key, state_dict, what)


def txv_densenet_torch_state_dict(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of convert_txv_densenet (features.* only; load into torch with strict=False)."""
    return _to_torch(arrays, _txv_key)


def to_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
    """Our arrays (float32 numpy, our layout) of a model: what save_weights writes."""
    return {k: np.array(jax.device_get(v.get_value()), np.float32) for k, v in _flat_variables(model).items()}


def save_weights(arrays: Mapping[str, np.ndarray], path: str) -> None:
    """One safetensors file of our arrays (from convert_lpips / convert_txv_densenet / to_arrays)."""
    from safetensors.numpy import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}, path,
              metadata={"format": "llmcxr-perceptual"})


def _metadata(path: str, missing_hint: str) -> dict[str, str]:
    """A safetensors file's metadata; MissingInputError(missing_hint) when there is no file."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise MissingInputError(missing_hint)
    user_files.check_safetensors(path, "converted weights file")
    try:
        with safe_open(path, "numpy") as f:
            return dict(f.metadata() or {})
    except SafetensorError as e:
        raise UsageError(f"{path} is not a safetensors file ({e}); give a `llmcxr convert-weights` output") from None


def _load(make: Callable[[], nnx.Module], path: str, missing_hint: str, ignore: tuple[str, ...] = ()) -> Any:
    """Build the model abstractly (no init work) and fill every variable from the file (less `ignore`)."""
    _metadata(path, missing_hint)
    arrays = {k: v for k, v in user_files.load_safetensors(path, "converted weights file").items() if k not in ignore}
    model = nnx.eval_shape(make)
    variables = _flat_variables(model)
    missing, unexpected = sorted(set(variables) - set(arrays)), sorted(set(arrays) - set(variables))
    if missing or unexpected:
        bad = f"lacks {missing[0]!r}" if missing else f"has unexpected {unexpected[0]!r}"
        raise UsageError(f"{path} {bad} ({len(missing)} missing, {len(unexpected)} unexpected); convert it again")
    for key, var in variables.items():
        if arrays[key].shape != var.get_value().shape:
            raise UsageError(f"{path}: {key!r} has shape {arrays[key].shape}, expected {var.get_value().shape}")
        var.set_value(jnp.asarray(arrays[key], var.get_value().dtype))
    return model


def load_lpips(path: str, cfg: LPIPSConfig) -> LPIPS:
    hint = (f"LPIPS weights {path} not found; convert them once with `llmcxr convert-weights lpips "
            f"--vgg16 VGG16.pth --lin vgg.pth --out {path}`")
    return _load(lambda: LPIPS(cfg, rngs=None), path, hint)


def load_txv_densenet(path: str, *, dtype: str, param_dtype: str) -> DenseNet:
    hint = (f"CIP DenseNet weights {path} not found; convert them once with `llmcxr convert-weights txv "
            f"--state-dict DENSENET.pth --out {path}` (DENSENET.pth: torch.save(xrv.models.DenseNet("
            f"weights='densenet121-res224-all').state_dict(), 'DENSENET.pth'))")
    # a classifier file (convert-weights txv --classifier) holds the same features plus its head
    head = TXV_HEAD if _metadata(path, hint).get("format") == CLASSIFIER_FORMAT else ()
    return _load(lambda: DenseNet(txv_densenet121(dtype, param_dtype), rngs=None), path, hint, ignore=head)


# ---------------------------------------------------------------------------------------------
# torchxrayvision classifier: features + classifier + op_threshs; pathology names and architecture
# in the file's metadata

TXV_HEAD = ("classifier.kernel", "classifier.bias", "op_threshs")  # what a classifier file adds to the features
CLASSIFIER_FORMAT = "llmcxr-txv-classifier"
_TXV_WHAT = "torchxrayvision DenseNet weights"


@dataclasses.dataclass(frozen=True)
class TxvClassifierWeights:
    """A converted torchxrayvision DenseNet classifier: our float32 arrays, the trunk's architecture
    (DenseNetConfig fields less the dtypes) and each output's pathology ('' where it predicts nothing)."""

    arrays: dict[str, np.ndarray]
    config: dict[str, Any]
    targets: tuple[str, ...]

    def model_config(self, dtype: str = "float32", param_dtype: str = "float32") -> DenseNetConfig:
        return DenseNetConfig(**self.config, dtype=dtype, param_dtype=param_dtype)


def _module_state_dict(obj: Any, path: str, prefix: str = "") -> dict[str, Any]:
    """What state_dict() of a pickled torch nn.Module (rebuilt as a safe_pickle stand-in, never run)
    returns: its parameters and persistent buffers, then its children's under dotted names."""
    state = obj.state if isinstance(obj, safe_pickle.StandIn) else None
    if not isinstance(state, dict) or not isinstance(state.get("_modules"), dict):
        raise UsageError(f"{path} holds a pickled {type(obj).__name__ if state is None else type(obj).pickle_global} "
                         f"at {prefix or 'its top'}, not a torch nn.Module or state dict; give "
                         "torch.save(model.state_dict(), PATH)")
    transient = state.get("_non_persistent_buffers_set") or ()
    out = {prefix + k: v for k, v in (state.get("_parameters") or {}).items() if v is not None}
    buffers = (state.get("_buffers") or {}).items()
    out.update({prefix + k: v for k, v in buffers if v is not None and k not in transient})
    for name, child in state["_modules"].items():
        if child is not None:
            out.update(_module_state_dict(child, path, f"{prefix}{name}."))
    return out


def read_txv_weights(path: str) -> dict[str, np.ndarray]:
    """A torchxrayvision DenseNet's state dict (a torch.save(model.state_dict()) file) or the whole
    pickled model (as xrv's downloaded .pt files hold it; rebuilt as data, nothing run) -> numpy
    arrays by state-dict key, floating ones float32."""
    obj = read_torch_file(path, _TXV_WHAT, mmap=True)
    if not isinstance(obj, safe_pickle.StandIn):
        return read_torch_state_dict(path, _TXV_WHAT)
    torch = require_torch(_TXV_WHAT)
    tensors = _module_state_dict(obj, path)
    if "op_threshs" not in tensors and isinstance(obj.state.get("op_threshs"), torch.Tensor):
        tensors["op_threshs"] = obj.state["op_threshs"]  # set as a plain attribute, not a buffer
    out = {}
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.is_meta:
            raise UsageError(f"{path}: {key} is not a tensor with data; save the real weights")
        t = t.detach().resolve_conj().resolve_neg()
        out[key] = np.array(t.float().numpy() if t.is_floating_point() else t.numpy())  # a copy: the map closes
    return out


def txv_config_from_state_dict(state_dict: Mapping[str, Any], what: str = _TXV_WHAT) -> dict[str, Any]:
    """The DenseNet architecture a torchxrayvision state dict holds (read from its keys and shapes)."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise UsageError(f"{what} lacks {key!r}; is it a torchxrayvision DenseNet?")
        return tuple(np.shape(state_dict[key]))

    blocks: list[int] = []
    while f"features.denseblock{len(blocks) + 1}.denselayer1.conv1.weight" in state_dict:
        b, n = len(blocks) + 1, 1
        while f"features.denseblock{b}.denselayer{n + 1}.conv1.weight" in state_dict:
            n += 1
        blocks.append(n)
    conv0 = shape("features.conv0.weight")  # [init, in, 7, 7]
    mid = shape("features.denseblock1.denselayer1.conv1.weight")[0]  # bn_size * growth
    growth = shape("features.denseblock1.denselayer1.conv2.weight")[0]
    if len(conv0) != 4 or mid % growth:
        raise UsageError(f"{what}: conv0 {conv0} / denselayer1 widths {mid}, {growth} are not a DenseNet's")
    return {"growth_rate": growth, "block_config": tuple(blocks), "num_init_features": conv0[0],
            "bn_size": mid // growth, "in_channels": conv0[1]}


def _txv_head(state_dict: Mapping[str, Any], num_features: int, xrv_weights: str | None, what: str
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """(kernel [in, out], bias, op_threshs, targets) of the classifier in a state dict."""
    if "classifier.weight" not in state_dict or "classifier.bias" not in state_dict:
        raise UsageError(f"{what} has no classifier.weight / classifier.bias (DenseNet features only); give the whole "
                         "model's weights, or leave out --classifier to convert the features for FID / CIP")
    weight = np.asarray(state_dict["classifier.weight"], np.float32)  # [out, in]
    bias = np.asarray(state_dict["classifier.bias"], np.float32)
    if weight.ndim != 2 or weight.shape[1] != num_features or bias.shape != weight.shape[:1]:
        raise UsageError(f"{what}: classifier.weight {weight.shape} / bias {bias.shape} do not fit "
                         f"{num_features} features")
    targets, released = released_weights(xrv_weights) if xrv_weights else (TXV_PATHOLOGIES, None)
    if weight.shape[0] != len(targets):
        raise UsageError(f"{what}: its classifier has {weight.shape[0]} outputs, torchxrayvision's DenseNet "
                         f"{len(targets)} ({', '.join(TXV_PATHOLOGIES[:3])}, ...)")
    threshs = state_dict.get("op_threshs")
    if threshs is None:
        if released is None:
            raise UsageError(f"{what} has no op_threshs (torchxrayvision sets them from the weights' name); name the "
                             f"weights with --xrv-weights, one of {', '.join(RELEASED_OP_THRESHS)}")
        threshs = released
    threshs = np.asarray(threshs, np.float32)
    if threshs.shape != bias.shape:
        raise UsageError(f"{what}: op_threshs has shape {threshs.shape}, expected {bias.shape}")
    if released is not None and not np.allclose(threshs, released, rtol=1e-6, atol=0, equal_nan=True):
        raise UsageError(f"{what}: its op_threshs differ from torchxrayvision's for {xrv_weights}; leave out "
                         "--xrv-weights or give the file of those weights")
    return np.ascontiguousarray(weight.T), bias, threshs, tuple(targets)


def convert_txv_classifier(state_dict: Mapping[str, Any], *, xrv_weights: str | None = None,
                           what: str = _TXV_WHAT) -> TxvClassifierWeights:
    """A torchxrayvision DenseNet state dict with classifier.* and op_threshs (xrv sets op_threshs
    from the weights' name: with xrv_weights, e.g. 'densenet121-res224-all', they and the pathology
    names come from RELEASED_OP_THRESHS, and the file's must agree) -> our arrays. UsageError names
    a missing, unexpected or misshapen key."""
    config = txv_config_from_state_dict(state_dict, what)
    cfg = DenseNetConfig(**config, dtype="float32", param_dtype="float32")
    shapes = _shapes(lambda: DenseNet(cfg, rngs=None))
    expected = {_txv_key(k) for k in shapes} | {"classifier.weight", "classifier.bias", "op_threshs"}
    _refuse_unexpected(state_dict, expected, lambda k: not k.endswith(".num_batches_tracked"), what)
    arrays = _from_torch(shapes, _txv_key, state_dict, what)
    kernel, bias, threshs, targets = _txv_head(state_dict, cfg.num_features, xrv_weights, what)
    arrays.update({"classifier.kernel": kernel, "classifier.bias": bias, "op_threshs": threshs})
    return TxvClassifierWeights(arrays, config, targets)


def classifier_weights(model: DenseNetClassifier, targets: tuple[str, ...]) -> TxvClassifierWeights:
    """What save_txv_classifier writes for one of our models (e.g. randomly initialised)."""
    if len(targets) != model.num_classes:
        raise UsageError(f"{len(targets)} targets for a classifier of {model.num_classes} outputs")
    config = {f.name: getattr(model.cfg, f.name) for f in dataclasses.fields(model.cfg)
              if f.name not in ("dtype", "param_dtype")}
    return TxvClassifierWeights(to_arrays(model), config, tuple(targets))


def txv_classifier_torch_state_dict(weights: TxvClassifierWeights) -> dict[str, np.ndarray]:
    """Inverse of convert_txv_classifier: what xrv.models.DenseNet(...).load_state_dict takes."""
    a = weights.arrays
    out = _to_torch({k: v for k, v in a.items() if k not in TXV_HEAD}, _txv_key)
    out.update({"classifier.weight": np.ascontiguousarray(a["classifier.kernel"].T),
                "classifier.bias": a["classifier.bias"], "op_threshs": a["op_threshs"]})
    return out


def save_txv_classifier(weights: TxvClassifierWeights, path: str) -> None:
    """One safetensors file: the features (as save_weights writes them, so the CIP / FID loaders read
    it too), the head, and the pathology names and architecture in its metadata."""
    from safetensors.numpy import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    config = {**weights.config, "block_config": list(weights.config["block_config"])}
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in weights.arrays.items()}, path,
              metadata={"format": CLASSIFIER_FORMAT, "targets": json.dumps(list(weights.targets)),
                        "densenet": json.dumps(config)})


def load_txv_classifier_model(path: str, *, dtype: str = "float32", param_dtype: str = "float32"
                              ) -> tuple[DenseNetClassifier, tuple[str, ...]]:
    """(model, pathology name of each output) from a save_txv_classifier file."""
    hint = (f"torchxrayvision classifier weights {path} not found; convert them once with `llmcxr convert-weights "
            f"txv --classifier --state-dict DENSENET.pth --out {path}`")
    meta = _metadata(path, hint)
    if meta.get("format") != CLASSIFIER_FORMAT:
        raise UsageError(f"{path} holds DenseNet features only, not the classifier; convert the weights again with "
                         "`llmcxr convert-weights txv --classifier`")
    try:
        targets, config = json.loads(meta["targets"]), json.loads(meta["densenet"])
        cfg = DenseNetConfig(**config, dtype=dtype, param_dtype=param_dtype)
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: its classifier metadata is malformed ({e}); convert it again") from None
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise UsageError(f"{path}: its classifier metadata names no targets; convert it again")
    return _load(lambda: DenseNetClassifier(cfg, len(targets), rngs=None), path, hint), tuple(targets)
