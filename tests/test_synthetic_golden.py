"""The synthetic corpus is byte-for-byte what it was before it moved out of data/: the sha256 of
every file of a 24-image, 64 px corpus (seed 11) as `synthesize` wrote it at commit 513feaf, when it
lived in llmcxr_jax/data/synthetic.py. A change to a single pixel, word or CSV cell fails this; a
deliberate change to the corpus regenerates the manifest (see _manifest) and says so in its commit."""
import hashlib
import json
import os
import subprocess
import sys

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "synth_seed11_24x64.sha256.json")


def _manifest(root: str) -> dict:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return dict(sorted(out.items()))


def test_llmcxr_synth_writes_the_same_files_as_before_the_move(tmp_path):
    root = str(tmp_path / "corpus")
    cmd = [sys.executable, "-m", "llmcxr_jax.cli", "synth", "--out", root, "--num-images", "24", "--image-size", "64",
           "--seed", "11"]
    subprocess.run(cmd, check=True, capture_output=True)
    with open(GOLDEN) as f:
        golden = json.load(f)
    got = _manifest(root)
    assert sorted(got) == sorted(golden), "the corpus's file list changed"
    changed = [k for k in golden if got[k] != golden[k]]
    assert not changed, f"{len(changed)} files differ, first {changed[:3]}"

