"""Pickles read without running them: a pickle.Unpickler whose globals come from an allowlist of
data constructors, with every other class read as an inert stand-in and every other call refused.
data/codes.py reads LLM-CXR's codes pickles with it; convert/torch_files.py adds torch's tensors.

Safety rests on one rule: find_class never imports a module and never hands the unpickler a real
callable other than the allowlisted ones below (which check their arguments). A class from any
other module becomes a stand-in type that records what the pickle gives it (NEWOBJ / REDUCE
arguments, BUILD state, dict and list items) as plain data. The refusals on top of that rule
(modules that can run code, calls of function-like names) exist so that a file that asks to run
something is reported to the user instead of being read as if nothing had happened.
"""
from __future__ import annotations

import _compat_pickle
import collections
import pickle
from collections.abc import Callable, Mapping
from typing import Any

# Top-level packages whose globals can run code, start processes, touch files or rewrite the
# interpreter; any global of theirs is refused, whether the pickle calls it or only names it.
CODE_RUNNING_MODULES = frozenset({
    "builtins", "__builtin__", "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "_posixsubprocess", "sys",
    "functools", "operator", "_operator", "importlib", "imp", "runpy", "pickle", "_pickle", "pickletools", "copyreg",
    "copy_reg", "copy", "marshal", "types", "code", "codeop", "ctypes", "_ctypes", "shutil", "socket", "_socket",
    "ssl", "http", "urllib", "ftplib", "smtplib", "telnetlib", "xmlrpc", "webbrowser", "pty", "tty",
    "multiprocessing", "_multiprocessing", "threading", "_thread", "concurrent", "asyncio", "signal", "io", "_io",
    "tempfile", "gc", "inspect", "pdb", "bdb", "timeit", "trace", "profile", "cProfile", "shelve", "dbm", "sqlite3",
    "glob", "fileinput", "zipimport", "pkgutil", "site", "sysconfig", "distutils", "setuptools", "pip", "resource",
    "mmap", "fcntl", "select", "selectors", "_winapi", "msvcrt", "winreg", "venv", "ensurepip", "compileall",
    "py_compile", "codecs", "_codecs", "dill", "cloudpickle", "joblib",
})


class RefusedGlobal(pickle.UnpicklingError):
    """A global the pickle names or calls that this reader will not build; nothing was run."""

    def __init__(self, global_name: str, reason: str):
        self.global_name = global_name
        super().__init__(f"refusing {global_name}: {reason}")


def one_line(text: Any, limit: int = 120) -> str:
    """Text from a file as one short line of an error message (names in a pickle may hold newlines)."""
    return " ".join(str(text).split())[:limit]


# ---------------------------------------------------------------- stand-ins for classes of other modules

class StandInType(type):
    """Metaclass of stand-ins. Calling one (a pickle REDUCE or INST) builds an inert instance when
    the name looks like a class (CapWords, as Enum members and Lightning's objects are pickled);
    a function-like name is refused, since a pickle calls a function only to run it."""

    pickle_module: str
    pickle_name: str

    def __call__(cls, *args, **kwargs):
        if not cls.pickle_name.rsplit(".", 1)[-1][:1].isupper():
            raise RefusedGlobal(cls.pickle_global, "the file calls it while loading, which would run code")
        return cls.__new__(cls, *args, **kwargs)

    @property
    def pickle_global(cls) -> str:
        return f"{cls.pickle_module}.{cls.pickle_name}"

    def __repr__(cls) -> str:
        return f"<stand-in for {cls.pickle_global}>"


class StandIn(metaclass=StandInType):
    """An object of a class we never import. args/kwargs: what NEWOBJ or REDUCE passed; state: what
    BUILD passed (usually the object's __dict__); items / list_items: what SETITEMS / APPENDS
    added (dict and list subclasses such as Lightning's AttributeDict)."""

    pickle_module = "?"
    pickle_name = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args, self.kwargs, self.state = args, kwargs, None
        self.items: dict[Any, Any] = {}
        self.list_items: list[Any] = []
        return self

    def __setstate__(self, state) -> None:
        self.state = state

    def __setitem__(self, key, value) -> None:
        self.items[key] = value

    def append(self, value) -> None:
        self.list_items.append(value)

    def extend(self, values) -> None:
        self.list_items.extend(values)

    def add(self, value) -> None:  # ADDITEMS of a set subclass
        self.list_items.append(value)

    def __repr__(self) -> str:
        return f"<stand-in {type(self).pickle_global} object>"


def _stand_in_class(module: str, name: str) -> StandInType:
    attrs = {"pickle_module": module, "pickle_name": name, "__module__": __name__, "__qualname__": name}
    return StandInType(name.rsplit(".", 1)[-1], (StandIn,), attrs)


# ---------------------------------------------------------------- the allowlist

class Sealed:
    """Base of the objects of ours that a pickle gets hold of: no __dict__, no setattr, no BUILD, so a
    BUILD opcode aimed at one cannot rewrite it (a real function's __defaults__ could be set)."""

    __slots__ = ()

    def _seal(self, **fields) -> None:
        for key, value in fields.items():
            object.__setattr__(self, key, value)

    def __setattr__(self, key, value):
        raise pickle.UnpicklingError(f"cannot set {key} on {self!r}")

    def __delattr__(self, key):
        raise pickle.UnpicklingError(f"cannot delete {key} of {self!r}")

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"cannot BUILD {self!r}")


class Allowed(Sealed):
    """An allowlisted callable as the unpickler sees it (sealed)."""

    __slots__ = ("_fn", "_name")

    def __init__(self, fn: Callable, name: str):
        self._seal(_fn=fn, _name=name)

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<allowed {self._name}>"


def allowed(name: str) -> Callable[[Callable], Allowed]:
    """Decorator: fn -> Allowed(fn, name)."""
    return lambda fn: Allowed(fn, name)


# C types: immutable, harmless to call, to NEWOBJ and to name as references
_DATA_TYPES = {"dict": dict, "list": list, "tuple": tuple, "set": set, "frozenset": frozenset, "int": int,
               "float": float, "complex": complex, "str": str, "bool": bool, "object": object}
_SAFE_FACTORIES = (None, dict, list, set, tuple, int, float, str, collections.OrderedDict)


def _args_error(name: str, args: tuple) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(f"{name} called with {one_line(repr(args), 80)}, which no pickle of data writes")


def _latin1(name: str, args: tuple) -> bytes:
    if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
        return args[0].encode("latin-1")
    raise _args_error(name, args)


@allowed("_codecs.encode")
def _codecs_encode(*args):  # how protocol <= 2 writes bytes
    return _latin1("_codecs.encode", args)


@allowed("builtins.bytes")
def _bytes(*args):  # never bytes(n): a huge n would be an allocation the file does not pay for
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytes(args[0])
    return _latin1("builtins.bytes", args)


@allowed("builtins.bytearray")
def _bytearray(*args):
    if not args:
        return bytearray()
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytearray(args[0])
    return bytearray(_latin1("builtins.bytearray", args))


@allowed("builtins.type")
def _type_of_singleton(*args):  # type(None) is pickled as REDUCE(type, (None,))
    if len(args) == 1 and (args[0] is None or args[0] is NotImplemented or args[0] is Ellipsis):
        return type(args[0])
    raise _args_error("builtins.type", args)


@allowed("collections.defaultdict")
def _defaultdict(*args):  # its items follow as SETITEMS
    if len(args) > 1 or (args and not any(args[0] is f for f in _SAFE_FACTORIES)):
        raise _args_error("collections.defaultdict", args)
    return collections.defaultdict(*args)


@allowed("collections.Counter")
def _counter(*args):
    if len(args) > 1 or (args and not isinstance(args[0], dict)):
        raise _args_error("collections.Counter", args)
    return collections.Counter(*args)


def _new_object(name: str, cls, args: tuple, kwargs: dict):
    if isinstance(cls, StandInType):
        return cls.__new__(cls, *args, **kwargs)
    if any(cls is t for t in (*_DATA_TYPES.values(), collections.OrderedDict)) and not kwargs:
        return cls.__new__(cls, *args)
    raise _args_error(name, (cls,))


@allowed("copyreg.__newobj__")
def _newobj(cls, *args):  # protocol 0/1 spelling of NEWOBJ
    return _new_object("copyreg.__newobj__", cls, args, {})


@allowed("copyreg.__newobj_ex__")
def _newobj_ex(cls, args, kwargs):
    return _new_object("copyreg.__newobj_ex__", cls, tuple(args), dict(kwargs))


@allowed("copyreg._reconstructor")
def _reconstructor(cls, base, state):  # protocol 0/1 objects: (cls, object, None) or (cls, dict, {...})
    if not isinstance(cls, StandInType) or not any(base is t for t in _DATA_TYPES.values()):
        raise _args_error("copyreg._reconstructor", (cls, base))
    return cls.__new__(cls) if base is object else cls.__new__(cls, state)


DATA_GLOBALS: dict[tuple[str, str], Any] = {
    **{("builtins", k): v for k, v in _DATA_TYPES.items()},
    ("builtins", "bytes"): _bytes, ("builtins", "bytearray"): _bytearray, ("builtins", "type"): _type_of_singleton,
    ("builtins", "NotImplemented"): NotImplemented, ("builtins", "Ellipsis"): Ellipsis,
    ("_codecs", "encode"): _codecs_encode,
    ("collections", "OrderedDict"): collections.OrderedDict, ("collections", "defaultdict"): _defaultdict,
    ("collections", "Counter"): _counter,
    ("copyreg", "__newobj__"): _newobj, ("copyreg", "__newobj_ex__"): _newobj_ex,
    ("copyreg", "_reconstructor"): _reconstructor,
}


class Token(Sealed):
    """A name a pickle may mention but not call: numpy.ndarray, as the first argument of _reconstruct
    (calling the real type would hand out uninitialised memory of any size)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self._seal(name=name)

    def __repr__(self) -> str:
        return f"<{self.name}>"


NDARRAY = Token("numpy.ndarray")


def numpy_globals() -> dict[tuple[str, str], Any]:
    """What numpy writes for an array or a scalar (numpy 1.x says numpy.core, 2.x numpy._core): an
    empty array that BUILD then fills (numpy checks the sizes), a scalar, a dtype."""
    import numpy as np

    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]

    def reconstruct(subtype, shape, dtype):
        if subtype is not NDARRAY or shape != (0,):
            raise _args_error("numpy's _reconstruct", (subtype, shape))
        return multiarray._reconstruct(np.ndarray, (0,), dtype)

    out: dict[tuple[str, str], Any] = {("numpy", "ndarray"): NDARRAY, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core", "numpy._core"):
        out[(f"{mod}.multiarray", "_reconstruct")] = Allowed(reconstruct, f"{mod}.multiarray._reconstruct")
        out[(f"{mod}.multiarray", "scalar")] = multiarray.scalar  # a C function: immutable
        out[(f"{mod}.numeric", "_frombuffer")] = Allowed(numeric._frombuffer, f"{mod}.numeric._frombuffer")
    return out


# ---------------------------------------------------------------- the unpickler

class SafeUnpickler(pickle.Unpickler):
    """pickle.Unpickler that builds only `allowed` globals and, with stand_ins=True, inert
    stand-ins of other classes. Refusals raise RefusedGlobal before anything is called."""

    def __init__(self, file, *, allowed: Mapping[tuple[str, str], Any], stand_ins: bool, encoding: str = "ASCII"):
        super().__init__(file, encoding=encoding)
        self._allowed = allowed
        self._stand_ins = stand_ins
        self._classes: dict[tuple[str, str], StandInType] = {}

    def find_class(self, module, name):
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names, as protocol <= 2 writes them
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        key = (module, name)
        if key in self._allowed:
            return self._allowed[key]
        shown = one_line(f"{module}.{name}")
        # the package, or a module reached through attributes (STACK_GLOBAL "pathlib", "os.system")
        reached = [module.split(".", 1)[0], *name.split(".")[:-1]]
        if any(part in CODE_RUNNING_MODULES for part in reached):
            bad = next(part for part in reached if part in CODE_RUNNING_MODULES)
            raise RefusedGlobal(shown, f"a global of {bad}, whose globals can run code")
        if not self._stand_ins:
            raise RefusedGlobal(shown, "this file may hold only plain data")
        if key not in self._classes:
            self._classes[key] = _stand_in_class(module, name)
        return self._classes[key]

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(f"refusing the persistent id {one_line(repr(pid), 60)}: plain pickles have none")


# What pickle.Unpickler raises on bytes that are not a whole pickle (cut, overwritten, another format), or on
# a pickle that hands an allowlisted constructor arguments it refuses: faults of the file, not of this code.
MALFORMED = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError,
             OverflowError, RecursionError)


def describe(error: BaseException) -> str:
    """A MALFORMED error in a user's words: empty, cut short, not a pickle, or the parser's own reason."""
    text = str(error)
    if isinstance(error, EOFError) and "Ran out of input" in text:
        return "it is empty (no pickle in it)"
    if "pickle data was truncated" in text:
        return "it is cut short (its pickle stops mid-way); an interrupted copy or a full disk leaves this, copy " \
            "it again"
    if text.startswith("invalid load key"):
        return f"it is not a pickle, or its bytes are damaged ({one_line(text, 60)})"
    return f"{type(error).__name__}: {one_line(text, 160)}"


def load(file, *, allowed: Mapping[tuple[str, str], Any] | None = None, stand_ins: bool = False) -> Any:
    """One pickle from an open binary file; allowed defaults to DATA_GLOBALS."""
    return SafeUnpickler(file, allowed=DATA_GLOBALS if allowed is None else allowed, stand_ins=stand_ins).load()
