"""Python configs: `FILE[:VARIANT]` -> ml_collections.ConfigDict, then `KEY=VALUE` overrides.

A config file defines get_config(arg) and may load a sibling file with `load_sibling`;
`shipped_config` finds a file of configs/ in a checkout or, installed, in the wheel's package data.
An override naming a key that does not exist, or a value of the wrong type, is an error.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.resources
import importlib.util
import os
import pathlib
from collections.abc import Sequence

import ml_collections

from llmcxr_jax.errors import MissingInputError, UsageError


def dataclass_from_dict(cls, d: dict, what: str):
    """A frozen config dataclass from a dict that must name every field (extra keys ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    missing = names - set(d)
    if missing:
        raise UsageError(f"{what} lacks {sorted(missing)}")
    return cls(**{k: d[k] for k in names})


def _load_module(path: str):
    if not os.path.isfile(path):
        raise MissingInputError(f"config file {path} does not exist")
    name = "llmcxr_config_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except SyntaxError as e:  # the file is not Python (an error its code raises keeps its traceback)
        where = f" at line {e.lineno}" if e.lineno else ""
        raise UsageError(f"config file {e.filename or path} is not Python that parses{where}: {e.msg}") from None
    if not hasattr(module, "get_config"):
        raise UsageError(f"config file {path} defines no get_config(arg)")
    return module


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """"configs/x.py:variant" (variant optional) plus ["a.b=1", ...] overrides."""
    path, _, variant = spec.partition(":")
    module = _load_module(path)
    cfg = module.get_config(variant or None)
    apply_overrides(cfg, overrides)
    return cfg


def load_sibling(this_file: str, name: str, variant: str | None, **kwargs) -> ml_collections.ConfigDict:
    """For config files: get_config(variant, **kwargs) of another file in the same folder."""
    return _load_module(os.path.join(os.path.dirname(os.path.abspath(this_file)), name)).get_config(variant, **kwargs)


def shipped_config(name: str) -> str:
    """The path of configs/NAME ("demo.py", "ablations/tiny.py"): the copy a wheel installs as package
    data (llmcxr_jax/configs_files/, so it matches the installed code), else the checkout's configs/
    beside this package (editable installs, runs from the repo). Config files load their siblings by
    path, so only a folder on disk counts (not a zipped package)."""
    packaged = importlib.resources.files("llmcxr_jax") / "configs_files"
    checkout = pathlib.Path(__file__).resolve().parent.parent / "configs"
    for root in (packaged, checkout):
        if isinstance(root, pathlib.Path) and (root / name).is_file():
            return str(root / name)
    raise MissingInputError(f"configs/{name} is in neither the installed package ({packaged}) nor a checkout "
                            f"({checkout}); reinstall llmcxr-jax (its wheel ships configs/) or give the file's path")


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.removeprefix("--config.").removeprefix("config.")
        if not sep:
            raise UsageError(f"override {item!r} is not KEY=VALUE")
        parent, leaf = _parent(cfg, key)
        old = parent[leaf]
        parent[leaf] = _parse_like(old, text, key)


def _parent(cfg: ml_collections.ConfigDict, key: str):
    node = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise UsageError(f"config has no key {'.'.join(parts[:i + 1])!r} (override {key})")
        if i < len(parts) - 1:
            node = node[part]
    return node, parts[-1]


def _parse_like(old, text: str, key: str):
    if isinstance(old, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise UsageError(f"config key {key} is a bool; got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(old, int) and not isinstance(old, bool):
        try:
            return int(text)
        except ValueError:
            raise UsageError(f"config key {key} is an int; got {text!r}") from None
    if isinstance(old, float):
        try:
            return float(text)
        except ValueError:
            raise UsageError(f"config key {key} is a float; got {text!r}") from None
    if isinstance(old, str):
        return text
    if isinstance(old, ml_collections.ConfigDict):
        raise UsageError(f"config key {key} is a section; override its fields instead")
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def sweep_run_config(sweep_file: str, sweep: dict, run: str | None) -> ml_collections.ConfigDict:
    """For sweep files (configs/ablations/): one run's config (base + common + the run's overrides),
    so `llmcxr train --config configs/ablations/FILE.py:RUN` trains that run alone. Bases are
    repo-relative paths; launch/sweep.py fills in "{root}" in overrides."""
    names = tuple(sweep["runs"])
    run = run or names[0]
    if run not in names:
        raise UsageError(f"unknown run {run!r}; choose one of {names}")
    spec = sweep["runs"][run]
    spec = spec if isinstance(spec, dict) else {"overrides": spec}
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(sweep_file))))
    return load_config(os.path.join(repo, spec.get("base", sweep["base"])), sweep["common"] + spec["overrides"])
