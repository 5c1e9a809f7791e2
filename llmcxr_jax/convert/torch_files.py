"""Every PyTorch file we open, read without running it: torch.save's zip archive and its legacy
pickle stream, unpickled by safe_pickle's restricted unpickler plus torch's tensor rebuild
functions, with storages read from the file ourselves. Real Lightning checkpoints read (their
callbacks, hyper-parameters and optimizer objects of packages we never import become inert
stand-ins); a pickle that would call code is refused with the global it names.
"""
from __future__ import annotations

import importlib
import io
import os
import pickle
import struct
import sys
import tarfile
import zipfile
import zlib
from typing import Any

import numpy as np

from llmcxr_jax import safe_pickle
from llmcxr_jax.errors import MissingInputError, UsageError

INTEROP = "pip install 'llmcxr-jax[interop]'"
LEGACY_MAGIC, LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001  # torch.serialization's, for the pre-zip stream
# the typed-storage class names torch.save still writes in storage ids -> torch dtype names
STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
}
# dtypes as pickles name them (str(dtype)); ones this torch lacks are skipped
DTYPE_NAMES = (*STORAGE_DTYPES.values(), "complex32", "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2",
               "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "qint8", "quint8", "qint32", "quint4x2",
               "quint2x4", *(f"int{n}" for n in range(1, 8)), *(f"uint{n}" for n in range(1, 8)))
LAYOUT_NAMES = ("strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "jagged")
_UNSUPPORTED = {"_rebuild_qtensor": "quantized", "_rebuild_sparse_tensor": "sparse", "_rebuild_sparse_csr": "sparse",
                "_rebuild_nested_tensor": "nested", "_rebuild_wrapper_subclass": "tensor-subclass"}
_FIX = "if you trust the file, re-save only its weights with torch.save(model.state_dict(), PATH)"


def require_torch(what: str, *also: str):
    """The torch module (after checking that the packages in `also` import too), or a one-line
    error naming the [interop] extra that brings them."""
    try:
        import torch
    except ImportError:
        raise UsageError(f"{what} needs PyTorch, which is not installed; install it with {INTEROP}") from None
    for name in also:
        try:
            importlib.import_module(name)
        except ImportError:
            raise UsageError(f"{what} needs {name}, which is not installed; install it with {INTEROP}") from None
    return torch


# ---------------------------------------------------------------- what the unpickler may build

class _StorageKind(safe_pickle.Sealed):
    """What find_class gives for torch.FloatStorage & co.: a dtype, not a callable."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype):
        self._seal(name=name, dtype=dtype)

    def __repr__(self) -> str:
        return f"<storage kind {self.name}>"


class _Storage(safe_pickle.Sealed):
    """Bytes [offset, offset + nbytes) of a uint8 tensor holding one record of the file, seen as dtype."""

    __slots__ = ("data", "offset", "nbytes", "dtype")

    def __init__(self, data, offset: int, nbytes: int, dtype):
        self._seal(data=data, offset=offset, nbytes=nbytes, dtype=dtype)

    def __repr__(self) -> str:
        return f"<storage of {self.nbytes} bytes as {self.dtype}>"


def _ints(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(v) is int and v >= 0 for v in value):
        raise pickle.UnpicklingError(f"a tensor's {what} is {safe_pickle.one_line(repr(value), 60)}, not sizes")
    return value


def _torch_globals(torch) -> dict[tuple[str, str], Any]:
    """safe_pickle's data globals and numpy's, torch's dtypes and storage names, and our versions of
    the tensor rebuild functions torch's own weights_only unpickler allows. Tensors come back without
    grad, hooks or subclass: plain CPU tensors over the file's bytes."""

    def tensor(storage, offset, size, stride, dtype=None):
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError(f"a tensor's storage is {safe_pickle.one_line(repr(storage), 60)}")
        dtype = storage.dtype if dtype is None else dtype
        size, stride = _ints(tuple(size), "size"), _ints(tuple(stride), "stride")
        if not isinstance(dtype, torch.dtype) or type(offset) is not int or offset < 0 or len(size) != len(stride):
            raise pickle.UnpicklingError("a tensor's dtype, offset or strides are malformed")
        item = dtype.itemsize
        extent = 0 if 0 in size else 1 + sum((n - 1) * s for n, s in zip(size, stride))
        if storage.offset % item or (offset + extent) * item > storage.nbytes:
            raise pickle.UnpicklingError(f"a {dtype} tensor of size {size} reaches past its {storage.nbytes}-byte "
                                         "storage")
        return torch.empty(0, dtype=dtype).set_(storage.data.untyped_storage(), storage.offset // item + offset,
                                                size, stride)

    def metadata(t, meta):
        if meta:  # conj / neg bits of a view: the values depend on them
            if not isinstance(meta, dict) or not all(isinstance(k, str) and type(v) is bool for k, v in meta.items()):
                raise pickle.UnpicklingError("a tensor's metadata is not a dict of flags")
            torch._utils.set_tensor_metadata(t, meta)
        return t

    def plain(t):
        if not isinstance(t, torch.Tensor):
            raise pickle.UnpicklingError(f"a parameter's data is {safe_pickle.one_line(repr(t), 60)}, not a tensor")
        return t

    def from_type(func, new_type, args, state):  # tensors with attributes or of a subclass: keep the tensor
        if not any(func is f for f in rebuilds.values()) or not isinstance(args, tuple):
            raise pickle.UnpicklingError("_rebuild_from_type_v2 names a function that is not a tensor rebuild")
        return func(*args)

    def unsupported(kind):
        def refuse(*args):
            raise pickle.UnpicklingError(f"the file holds a {kind} tensor, which this reader does not rebuild; "
                                         "save dense tensors (tensor.to_dense() / dequantize())")
        return refuse

    def from_numpy(data, dtype, device, requires_grad=False):
        if not isinstance(data, np.ndarray) or data.dtype.kind not in "biufc":
            raise pickle.UnpicklingError("_rebuild_device_tensor_from_numpy got no numeric array")
        return torch.from_numpy(np.array(data)).to(dtype)

    def v1(storage, offset, size, stride):
        return tensor(storage, offset, size, stride)

    def v2(storage, offset, size, stride, requires_grad=False, hooks=None, meta=None):
        return metadata(tensor(storage, offset, size, stride), meta)

    def v3(storage, offset, size, stride, requires_grad, hooks, dtype, meta=None):
        return metadata(tensor(storage, offset, size, stride, dtype), meta)

    def meta_tensor(dtype, size, stride, requires_grad=False):
        return torch.empty_strided(_ints(tuple(size), "size"), _ints(tuple(stride), "stride"), dtype=dtype,
                                   device="meta")

    rebuilds = {
        "_rebuild_tensor": v1, "_rebuild_tensor_v2": v2, "_rebuild_tensor_v3": v3,
        "_rebuild_parameter": lambda data, requires_grad, hooks: plain(data),
        "_rebuild_parameter_with_state": lambda data, requires_grad, hooks, state: plain(data),
        "_rebuild_meta_tensor_no_storage": meta_tensor,
        "_rebuild_device_tensor_from_cpu_tensor": lambda data, dtype, device, grad=False: plain(data).to(dtype),
        "_rebuild_device_tensor_from_numpy": from_numpy,
        **{name: unsupported(kind) for name, kind in _UNSUPPORTED.items()},
    }
    rebuilds = {name: safe_pickle.Allowed(fn, f"torch._utils.{name}") for name, fn in rebuilds.items()}
    out = {**safe_pickle.DATA_GLOBALS, **safe_pickle.numpy_globals()}
    out.update({("torch._utils", name): fn for name, fn in rebuilds.items()})
    for module in ("torch._tensor", "torch.tensor"):  # torch < 1.9 said torch.tensor
        out[(module, "_rebuild_from_type_v2")] = safe_pickle.Allowed(from_type, "torch._tensor._rebuild_from_type_v2")
    layouts = {str(v): v for n in LAYOUT_NAMES if isinstance(v := getattr(torch, n, None), torch.layout)}
    out[("torch.serialization", "_get_layout")] = safe_pickle.Allowed(layouts.__getitem__,
                                                                    "torch.serialization._get_layout")
    out[("torch", "Size")] = torch.Size  # C types: immutable
    out[("torch", "device")] = torch.device
    dtypes = {name: getattr(torch, name, None) for name in DTYPE_NAMES}
    out.update({("torch", name): dtype for name, dtype in dtypes.items() if isinstance(dtype, torch.dtype)})
    for module in ("torch", "torch.cuda"):  # a checkpoint saved from a GPU names torch.cuda.FloatStorage
        out.update({(module, name): _StorageKind(name, getattr(torch, dt)) for name, dt in STORAGE_DTYPES.items()})
    for module in ("torch", "torch.storage"):
        out[(module, "UntypedStorage")] = _StorageKind("UntypedStorage", torch.uint8)
    return out


class _TorchUnpickler(safe_pickle.SafeUnpickler):
    """The restricted unpickler with tensors: a persistent id must be a storage of the file."""

    def __init__(self, file, torch, storages):
        super().__init__(file, allowed=_torch_globals(torch), stand_ins=True, encoding="utf-8")
        self._storages = storages

    def persistent_load(self, pid):
        tag = pid[0] if isinstance(pid, tuple) and len(pid) > 1 else None
        if (tag.decode("ascii", "replace") if isinstance(tag, bytes) else tag) != "storage" \
                or not isinstance(pid[1], _StorageKind):
            raise pickle.UnpicklingError(f"refusing the persistent id {safe_pickle.one_line(repr(pid), 60)}: only "
                                         "tensor storages are read")
        return self._storages(*pid[1:])


def _key(value) -> str:
    value = value.decode("ascii") if isinstance(value, bytes) else value
    if not isinstance(value, str) or not value or not value.replace("_", "").isalnum():
        raise pickle.UnpicklingError(f"storage key {safe_pickle.one_line(repr(value), 40)} is malformed")
    return value


def _numel(kind: _StorageKind, numel) -> int:
    if type(numel) is not int or numel < 0:
        raise pickle.UnpicklingError(f"storage size {safe_pickle.one_line(repr(numel), 40)} is malformed")
    return numel * kind.dtype.itemsize


# ---------------------------------------------------------------- torch.save's zip archive

def _read_zip(path: str, torch, mmap: bool, mapped: dict) -> Any:
    """mapped gets data_ptr -> (ZipInfo, bytes) of each record read through the memory map, whose CRC-32
    zipfile then never checks (_check_mapped does, for the records a state dict uses)."""
    with zipfile.ZipFile(path) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        tops = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(tops) != 1:
            raise pickle.UnpicklingError("the zip archive has no single <name>/data.pkl: it is not torch.save's")
        prefix = tops[0][: -len("data.pkl")]
        if prefix + "constants.pkl" in infos:
            raise pickle.UnpicklingError("it is a TorchScript archive (torch.jit.save), which runs code to load")
        if any(i.compress_type != zipfile.ZIP_STORED for i in infos.values()):
            raise pickle.UnpicklingError("it has compressed records, which torch.save never writes")
        order = zf.read(prefix + "byteorder").decode("ascii", "replace") if prefix + "byteorder" in infos else "little"
        if order != sys.byteorder:
            raise pickle.UnpicklingError(f"it was written on a {order}-endian machine; re-save it on a "
                                         f"{sys.byteorder}-endian one")
        whole = np.memmap(path, np.uint8, mode="c") if mmap else None  # copy-on-write, as torch's mmap=True
        loaded: dict[str, Any] = {}

        def storage(kind, key, location, numel):
            name = f"{prefix}data/{_key(key)}"
            nbytes = _numel(kind, numel)
            if name not in infos or infos[name].file_size != nbytes:
                raise pickle.UnpicklingError(f"record {name} is missing or not {nbytes} bytes long")
            if name not in loaded:
                loaded[name] = _record(zf, infos[name], whole, torch)
                if whole is not None and nbytes:
                    mapped[loaded[name].untyped_storage().data_ptr()] = (infos[name], loaded[name].numpy())
            return _Storage(loaded[name], 0, nbytes, kind.dtype)

        return _TorchUnpickler(io.BytesIO(zf.read(tops[0])), torch, storage).load()


def _record(zf: zipfile.ZipFile, info: zipfile.ZipInfo, whole, torch):
    """One stored record as a uint8 tensor: a view of the memory map, or its bytes read into memory."""
    if not info.file_size:
        return torch.empty(0, dtype=torch.uint8)
    if whole is not None:
        head = bytes(whole[info.header_offset: info.header_offset + 30])  # the record's local header
        if head[:4] != b"PK\x03\x04":
            raise pickle.UnpicklingError(f"record {info.filename} has no local header")
        start = info.header_offset + 30 + int.from_bytes(head[26:28], "little") + int.from_bytes(head[28:30], "little")
        return torch.from_numpy(np.asarray(whole[start: start + info.file_size]))
    buf = bytearray(info.file_size)
    with zf.open(info) as f:  # checks the record's CRC
        _read_into(f, memoryview(buf), info.filename)
    return torch.frombuffer(buf, dtype=torch.uint8)


def _read_into(f, view: memoryview, what: str) -> None:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise EOFError(f"{what} ends early: the file is cut short; an interrupted copy or a full disk leaves "
                           "this, copy it again")
        got += n


# ---------------------------------------------------------------- torch.save's legacy stream

def _read_legacy(path: str, torch) -> Any:
    """Magic number, protocol, sys info, the object's pickle, the storage keys, then each storage's
    element count (int64) and bytes, in the keys' order."""
    with open(path, "rb") as f:
        try:  # a pickle of data reads (and is then not torch's); one that would call code is refused
            magic = safe_pickle.load(f, allowed={**safe_pickle.DATA_GLOBALS, **safe_pickle.numpy_globals()},
                                     stand_ins=True)
        except safe_pickle.RefusedGlobal:
            raise
        except safe_pickle.MALFORMED as e:  # whatever the first bytes are, they do not start a torch file
            raise pickle.UnpicklingError("it is neither torch.save's zip archive nor its legacy stream "
                                         f"({safe_pickle.describe(e)})") from None
        if magic != LEGACY_MAGIC:
            raise pickle.UnpicklingError("it is a pickle, but neither torch.save's zip archive nor its legacy stream")
        if safe_pickle.load(f, allowed={}) != LEGACY_PROTOCOL:
            raise pickle.UnpicklingError("its legacy protocol version is not 1001")
        info = safe_pickle.load(f, allowed={})
        if not isinstance(info, dict) or info.get("little_endian", True) != (sys.byteorder == "little"):
            raise pickle.UnpicklingError("it was written on a machine of the other byte order; re-save it there")
        roots: dict[str, tuple[Any, int]] = {}  # key -> (uint8 tensor, element size)

        def storage(kind, key, location, numel, view=None):
            key, nbytes = _key(key), _numel(kind, numel)
            if key not in roots:
                roots[key] = (torch.empty(nbytes, dtype=torch.uint8), kind.dtype.itemsize)
            data = roots[key][0]
            if data.numel() != nbytes:
                raise pickle.UnpicklingError(f"storage {key} is given two sizes")
            if view is None:
                return _Storage(data, 0, nbytes, kind.dtype)
            _, offset, size = view
            start, length = _numel(kind, offset), _numel(kind, size)
            if start + length > nbytes:
                raise pickle.UnpicklingError(f"a view of storage {key} reaches past it")
            return _Storage(data, start, length, kind.dtype)

        obj = _TorchUnpickler(f, torch, storage).load()
        keys = safe_pickle.load(f, allowed={})
        if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(roots):
            raise pickle.UnpicklingError("its list of storages does not match the storages its pickle uses")
        for key in keys:
            data, item = roots[key]
            (count,) = struct.unpack("<q", f.read(8))
            if count * item != data.numel():
                raise pickle.UnpicklingError(f"storage {key} holds {count} elements, its pickle says "
                                             f"{data.numel() // item}")
            _read_into(f, memoryview(data.numpy()), f"storage {key}")
    return obj


# ---------------------------------------------------------------- the readers

def read_torch_file(path: str, what: str = "torch file", *, mmap: bool = False) -> Any:
    """Whatever torch.save wrote, rebuilt without running it: tensors (plain CPU, no grad),
    containers, and StandIn objects for classes of other packages (their state kept as data).
    mmap maps the zip archive's storages copy-on-write instead of reading them. A global the
    file would call, or one of a module that can run code, is a one-line UsageError."""
    return _read(os.fspath(path), what, mmap, {})


def _read(path: str, what: str, mmap: bool, mapped: dict) -> Any:
    if not os.path.isfile(path):
        raise MissingInputError(f"{what} {path} does not exist")
    torch = require_torch(f"reading {what} {path}")
    try:
        if zipfile.is_zipfile(path):
            return _read_zip(path, torch, mmap, mapped)
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":  # a zip's first record, but no central directory at the end
                raise pickle.UnpicklingError("it starts as torch.save's zip archive but its end (the zip's central "
                                             "directory) is missing: the file is cut short; an interrupted copy or a "
                                             "full disk leaves this, copy it again")
        if tarfile.is_tarfile(path):
            raise pickle.UnpicklingError("it is in the .tar layout of torch < 0.4; load it there and re-save it")
        return _read_legacy(path, torch)
    except safe_pickle.RefusedGlobal as e:
        raise UsageError(f"{what} {path}: {e}; nothing in the file was run ({_FIX})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError,
            OverflowError, RuntimeError, struct.error, zipfile.BadZipFile) as e:
        damaged = "; its bytes are damaged (a bad disk or copy), copy it again" if "Bad CRC-32" in str(e) else ""
        raise UsageError(f"{path} is not a readable torch file ({what}): {safe_pickle.one_line(e, 200)}"
                         f"{damaged}") from None


def read_torch_tensors(path: str, what: str = "torch state dict", *, mmap: bool = False) -> dict[str, Any]:
    """A state dict (or a Lightning checkpoint's "state_dict") -> {name: torch tensor, detached}; with
    mmap the records these tensors view are checked against the archive's CRC-32s."""
    mapped: dict = {}
    obj = _read(os.fspath(path), what, mmap, mapped)
    torch = require_torch(what)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if isinstance(sd, safe_pickle.StandIn):
        raise UsageError(f"{path} holds a pickled {type(sd).pickle_global} object, not a state dict of tensors; "
                         "rebuilding it needs arbitrary unpickling, which is refused. Re-save its weights with "
                         "torch.save(model.state_dict(), path)")
    if not isinstance(sd, dict):
        raise UsageError(f"{path} holds no state dict of tensors (it holds a {type(sd).__name__}); give a "
                         "torch.save(model.state_dict(), path) file")
    bad = next((k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise UsageError(f"{path} holds no state dict of tensors: its entry {safe_pickle.one_line(repr(bad), 60)} "
                         f"is a {type(sd[bad]).__name__}")
    tensors = {k: v.detach() for k, v in sd.items()}
    _check_mapped(path, tensors, mapped)
    return tensors


def _check_mapped(path: str, tensors: dict[str, Any], mapped: dict) -> None:
    """Each memory-mapped record one of `tensors` views, read once against its CRC-32 (records no tensor
    views, such as a Lightning file's optimizer states, stay unread): flipped bytes are named, not loaded."""
    for key, t in tensors.items():
        info, data = mapped.pop(t.untyped_storage().data_ptr(), (None, None)) if not t.is_meta else (None, None)
        if info is not None and zlib.crc32(data) != info.CRC:
            raise UsageError(f"{path}: the bytes of tensor {key} (zip record {info.filename}) fail their CRC-32 "
                             "check; the file is damaged (a bad disk or copy), copy it again")


def read_torch_state_dict(path: str, what: str = "torch state dict") -> dict[str, np.ndarray]:
    """A state dict (or {"state_dict": ...}) -> numpy copies, floating tensors as float32; nothing in
    the file is executed (see read_torch_file), so a whole pickled model is refused with how to re-save
    it. The zip archive is memory-mapped, so a Lightning file's optimizer states are never read."""
    out = {}
    for key, t in read_torch_tensors(path, what, mmap=True).items():
        if t.is_meta:
            raise UsageError(f"{path}: tensor {key} has no data (a meta tensor); save the real weights")
        t = t.resolve_conj().resolve_neg()
        out[key] = np.array(t.float().numpy() if t.is_floating_point() else t.numpy())  # a copy: the map closes
    return out
