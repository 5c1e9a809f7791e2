"""`llmcxr compile-check` on the real LM train step: a GPU mesh shape check on CPU, a TPU v4-16
compile (needs libtpu), and the one-line HBM failure for a model that cannot fit."""
import json
import os

import pytest

from llmcxr_jax import cli

STAGE1 = os.path.join(os.path.dirname(__file__), "..", "configs", "llmcxr_stage1.py")


def _run(capsys, *args):
    code = cli.main(["compile-check", "--config", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_tiny_step_compiles_for_a_gpu_mesh_on_cpu(capsys, tmp_path):
    code, out, err = _run(capsys, f"{STAGE1}:tiny", "--topology", "gpu:1x8", "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["fits"] and report["argument_bytes"] > 0 and report["tokens_per_second"] > 0
    assert "fits" in err and json.load(open(tmp_path / "r.json"))["fits"]


@pytest.mark.tpu
def test_tiny_step_compiles_for_v4_16(capsys):
    pytest.importorskip("libtpu")
    code, out, err = _run(capsys, f"{STAGE1}:tiny", "--topology", "v4-16")
    assert code == 0, err
    assert "v4-16" in err and json.loads(out.strip().splitlines()[-1])["fits"]


@pytest.mark.tpu
def test_12b_without_sharding_does_not_fit_a_v5e_4(capsys):
    pytest.importorskip("libtpu")
    code, _, err = _run(capsys, f"{STAGE1}:12b", "--topology", "v5e-4", "--mesh", "4,1,1")
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert "does not fit" in line and "HBM" in line


def test_unknown_topology_is_one_line(capsys):
    code, _, err = _run(capsys, f"{STAGE1}:tiny", "--topology", "v9-32")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "v9-32" in err
