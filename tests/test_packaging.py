"""Packaging: the sdist and wheel ship every config file (package data, llmcxr_jax/configs_files/),
requirements-lock.txt pins exactly what install.sh installs, a missing optional extra is a one-line
error, and (slow) a non-editable install runs `llmcxr demo --quick` away from the checkout."""
import glob
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from llmcxr_jax import configs
from llmcxr_jax.errors import MissingInputError

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CONFIG_FILES = sorted(os.path.relpath(p, os.path.join(ROOT, "configs"))
                      for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True))
PACKAGED = "llmcxr_jax/configs_files/"


def _source_copy(dst) -> str:
    """What setup.py builds from, copied, so a build writes no build/ or egg-info into the shared
    checkout and no stale build/lib of an earlier build can stand in for a missing file."""
    src = os.path.join(str(dst), "src")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("llmcxr_jax", "configs"):
        shutil.copytree(os.path.join(ROOT, name), os.path.join(src, name), ignore=skip)
    for name in ("setup.py", "pyproject.toml", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), src)
    return src


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """sdist from a copy of the source, then the wheel from that sdist (as `python -m build` does),
    with this environment's setuptools (no download)."""
    tmp = tmp_path_factory.mktemp("dist")
    src = _source_copy(tmp)
    out = str(tmp / "out")
    _run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({out!r})"], cwd=src)
    (sdist,) = glob.glob(os.path.join(out, "*.tar.gz"))
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", out, sdist])
    (wheel,) = glob.glob(os.path.join(out, "*.whl"))
    return sdist, wheel


def test_sdist_and_wheel_ship_every_config_file_and_the_license(dists):
    sdist, wheel = dists
    assert CONFIG_FILES and "demo.py" in CONFIG_FILES and "ablations/tiny.py" in CONFIG_FILES
    with tarfile.open(sdist) as t:
        in_sdist = [m.split("/", 1)[1] for m in t.getnames() if "/" in m]  # less the top folder
    assert {f"configs/{f}" for f in CONFIG_FILES} <= set(in_sdist)
    assert "LICENSE" in in_sdist
    with zipfile.ZipFile(wheel) as z:
        members = z.namelist()
        meta = z.read(next(m for m in members if m.endswith(".dist-info/METADATA"))).decode()
        entry_points = z.read(next(m for m in members if m.endswith(".dist-info/entry_points.txt"))).decode()
    assert sorted(m.removeprefix(PACKAGED) for m in members if m.startswith(PACKAGED)) == CONFIG_FILES
    assert any(m.endswith(".dist-info/licenses/LICENSE") for m in members)
    assert "llmcxr_jax/cli/demo.py" in members and "llmcxr = llmcxr_jax.cli.main:main" in entry_points
    assert "License-Expression: Apache-2.0" in meta
    assert {"interop", "tfds", "test"} <= set(re.findall(r"^Provides-Extra: (\S+)$", meta, re.M))


def _requires(reqs, extras) -> list[Requirement]:
    """The requirements among `reqs` (Requires-Dist strings) that apply with `extras` on this Python."""
    out = []
    for text in reqs or ():
        r = Requirement(text)
        if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in {"", *extras}):
            out.append(r)
    return out


def test_lock_pins_exactly_what_install_sh_installs(dists):
    """The closure of the wheel's [test] requirements through the installed packages' metadata, plus
    what install.sh installs by name (pip, and taming / torchxrayvision without their dependencies),
    is the lock's set: a new dependency without its pin, or a pin nothing needs, fails here."""
    with zipfile.ZipFile(dists[1]) as z:
        meta = z.read(next(m for m in z.namelist() if m.endswith(".dist-info/METADATA"))).decode()
    todo = _requires(re.findall(r"^Requires-Dist: (.+)$", meta, re.M), {"test"})
    needed = set()
    while todo:
        r = todo.pop()
        name = canonicalize_name(r.name)
        if (name, frozenset(r.extras)) in needed:
            continue
        needed.add((name, frozenset(r.extras)))
        try:
            todo += _requires(metadata.distribution(name).requires, r.extras)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{name} (needed by llmcxr-jax[test]) is not installed here; run bash install.sh")
    install_sh = open(os.path.join(ROOT, "install.sh")).read()
    by_name = {"pip"} | {canonicalize_name(n) for n in re.findall(r"--no-deps .*?([A-Za-z0-9_.-]+)==", install_sh)}
    assert {"taming-transformers-rom1504", "torchxrayvision"} <= by_name
    expected = {name for name, _ in needed} | by_name
    lines = [ln.strip() for ln in open(os.path.join(ROOT, "requirements-lock.txt")) if ln.strip()]
    assert lines[0].startswith("# Tested set") and all(ln.startswith("#") or "==" in ln for ln in lines)
    pinned = {canonicalize_name(ln.split("==")[0]) for ln in lines if not ln.startswith("#")}
    assert not expected - pinned, f"needed but not pinned in requirements-lock.txt: {sorted(expected - pinned)}"
    assert not pinned - expected, f"pinned but installed by nothing: {sorted(pinned - expected)}"
    assert "llmcxr-jax" not in pinned and "torch==2.13.0" in lines


def test_a_missing_tensorflow_datasets_names_the_extra_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # `import tensorflow_datasets` now fails
    monkeypatch.delitem(sys.modules, "llmcxr_jax.data.tfds_mimic_cxr", raising=False)
    with pytest.raises(ModuleNotFoundError) as e:
        importlib.import_module("llmcxr_jax.data.tfds_mimic_cxr")
    assert "pip install 'llmcxr-jax[tfds]'" in str(e.value) and "\n" not in str(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_shipped_config_prefers_the_packaged_copy_then_the_checkout(tmp_path, monkeypatch):
    checkout = os.path.join(ROOT, "configs", "demo.py")
    assert configs.shipped_config("demo.py") == checkout  # this checkout: no llmcxr_jax/configs_files/
    os.makedirs(tmp_path / "configs_files" / "ablations")
    (tmp_path / "configs_files" / "ablations" / "tiny.py").write_text("")
    monkeypatch.setattr(configs.importlib.resources, "files", lambda package: tmp_path)  # an installed wheel
    assert configs.shipped_config("ablations/tiny.py") == str(tmp_path / "configs_files" / "ablations" / "tiny.py")
    assert configs.shipped_config("demo.py") == checkout
    with pytest.raises(MissingInputError, match=r"configs/nope.py is in neither the installed package") as e:
        configs.shipped_config("nope.py")
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_installed_wheel_runs_the_quick_demo_outside_the_checkout(tmp_path):
    """`pip install .` (not editable) into a new venv, then `llmcxr demo --quick` from another folder.
    The new venv's own site-packages holds only llmcxr-jax, built from a copy of the source; the
    third-party packages come from this test's environment through a path (.pth) line, so nothing
    is downloaded and they sit after the wheel's files on sys.path (`python -m venv
    --system-site-packages` would not do: from a venv's interpreter it exposes the base Python's
    packages, not this venv's). That .pth line is not a site dir, so the editable install's finder
    in this environment stays off. What this proves: the installed package, configs included,
    does not need the checkout; that the declared requirements suffice is the lock test's and
    install.sh's (a fresh venv from the index)."""
    venv, run_dir = tmp_path / "venv", tmp_path / "elsewhere"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = str(venv / "bin" / "python")
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    parent = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    with open(os.path.join(site, "parent_site_packages.pth"), "w") as f:
        f.write("\n".join(sorted(parent)) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
    env.update(XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PATH=str(venv / "bin") + os.pathsep + env["PATH"])
    _run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", _source_copy(tmp_path)],
         env=env)
    os.makedirs(run_dir)
    where = _run([python, "-c", "import llmcxr_jax; from llmcxr_jax import configs; "
                  "print(llmcxr_jax.__file__); print(configs.shipped_config('demo.py'))"], cwd=run_dir, env=env)
    package, demo_config = where.stdout.split()
    assert package == os.path.join(site, "llmcxr_jax", "__init__.py")
    assert demo_config == os.path.join(site, "llmcxr_jax", "configs_files", "demo.py")
    done = _run([str(venv / "bin" / "llmcxr"), "demo", "--quick", "--workdir", "W"], cwd=run_dir, env=env,
                timeout=1200)
    print(done.stderr[-2000:], done.stdout[-1000:])
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["workdir"] == "W" and out["same_greedy_report_in_pytorch"] is True
    state = json.load(open(run_dir / "W" / "phases.json"))
    assert state["codes"]["result"]["images"] == 160 and os.path.isfile(run_dir / "W" / "summary.md")
