"""The Python API: docs/api_snippet.py (the README's example) runs on the quick demo's model and gives
a report, an image and an answer of the promised types; `import llmcxr_jax` stays cheap; every kind
of image input (path, bytes, PIL, 8- and 16-bit arrays) reaches the model as `generate` reads files."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from llmcxr_jax.errors import UsageError

SNIPPET = os.path.join(os.path.dirname(__file__), "..", "docs", "api_snippet.py")


def _run_snippet(workdir: str, here) -> dict:
    """The snippet's globals after running it in the folder `here`, runs/demo_full being `workdir`."""
    with open(SNIPPET) as f:
        code = f.read()
    assert code.count('"runs/demo_full/') == 3
    code = code.replace('"runs/demo_full/', f'"{workdir}/')
    before = os.getcwd()
    os.chdir(here)
    try:
        scope = {"__name__": "__main__"}
        exec(compile(code, SNIPPET, "exec"), scope)
        scope["drawn"] = Image.open("drawn.png")
        scope["drawn"].load()
    finally:
        os.chdir(before)
    return scope


def test_readme_snippet_and_the_api(quick_demo, tmp_path):
    """One test, so that the suite's `-n 3` loads and compiles the model in one worker; each step
    after the snippet's own checks is a function below."""
    from llmcxr_jax import Generator, api

    ran = _run_snippet(quick_demo.workdir, tmp_path)
    assert Generator is api.Generator and isinstance(ran["g"], Generator)
    assert isinstance(ran["report"], str) and ran["report"].strip()
    assert isinstance(ran["answer"], str) and ran["answer"].strip()
    image = ran["image"]
    assert image.dtype == np.uint8 and image.shape == (32, 32, 3)  # the quick demo's VQ-GAN: 32 px, RGB
    assert ran["drawn"].size == (32, 32)
    # the defaults are LLM-CXR's sampling with seed 0: the same call again gives the same report
    assert ran["g"].report(ran["cxr"]) == ran["report"]
    _progress_counts_every_code_and_changes_nothing(ran)
    _every_image_input_reads_as_the_file(ran["g"].batch, ran["cxr"], tmp_path)
    _bad_input_is_a_usage_error(ran["g"])


def test_import_is_cheap_and_generator_is_lazy():
    """`import llmcxr_jax` loads neither jax nor the API (in a fresh interpreter); the first use of
    llmcxr_jax.Generator does (test_readme_snippet_and_the_api)."""
    code = "import sys, llmcxr_jax; print(sorted(m for m in ('jax', 'llmcxr_jax.api') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    with pytest.raises(AttributeError, match="no attribute 'Generators'"):
        import llmcxr_jax

        llmcxr_jax.Generators  # noqa: B018


def _every_image_input_reads_as_the_file(g, cxr: str, tmp_path):
    """A path, the file's bytes, a PIL image and its array give the file's codes; an 8-bit grey array,
    its 16-bit twin and that twin as a PNG give one another's."""
    path = cxr
    pil = Image.open(path)
    grey = np.array(pil.convert("L").resize((47, 60)))
    grey[0, :2] = 0, 255  # the full 8-bit range: a 16-bit image is stretched to it (data/images.py)
    wide = grey.astype(np.uint16) * 257  # the same CXR in 16 bits, as converted from DICOM
    png16 = str(tmp_path / "cxr16.png")
    Image.fromarray(wide).save(png16)
    with open(path, "rb") as f:
        raw = f.read()
    codes = g.encode_images([path, raw, pil, np.asarray(pil), Image.fromarray(grey), grey, wide, png16])
    assert (codes[1:4] == codes[0]).all()
    assert (codes[5:] == codes[4]).all()


def _bad_input_is_a_usage_error(g):
    for call, message in [
        (lambda: g.report(["a.png", "b.png"]), "image must be one CXR, got a list"),
        (lambda: g.report(np.zeros((8, 8), np.float32)), "uint8 / uint16"),
        (lambda: g.report(io.BytesIO(b"not an image")), "cannot read image"),
        (lambda: g.image(["Effusion."]), "report must be one string"),
        (lambda: g.image("Effusion. " * 400), f"tokens; this model takes at most {g.batch.prompt_width}"),
        (lambda: g.answer(np.zeros((8, 8), np.uint8), "  "), "one non-empty question"),
        (lambda: g.report(np.zeros((8, 8), np.uint8), temperature=0), "temperature must be > 0"),
    ]:
        with pytest.raises(UsageError) as e:
            call()
        assert message in str(e.value), (message, str(e.value))


def _progress_counts_every_code_and_changes_nothing(ran):
    """progress= decodes with the step hook (what `llmcxr serve` shows): the same image as without it,
    told every code as it is drawn."""
    seen = []
    again = ran["g"].image("Small left pleural effusion.", seed=1, progress=lambda done, n: seen.append((done, n)))
    assert np.array_equal(again, ran["image"])
    counts = [done for done, _ in seen]
    assert {n for _, n in seen} == {64} and counts[0] == 0 and counts[-1] == 64 and counts == sorted(counts)
    assert set(range(65)) <= set(counts)


def test_readme_shows_the_snippet_as_it_runs():
    """The README's Python example is docs/api_snippet.py's code (less its docstring), so what readers copy is
    what test_readme_snippet_and_the_api runs."""
    with open(SNIPPET) as f:
        code = f.read()
    body = code[code.index('"""', 3) + 3:].strip()
    with open(os.path.join(os.path.dirname(SNIPPET), "..", "README.md")) as f:
        assert f"```python\n{body}\n```" in f.read(), "paste docs/api_snippet.py's code into the README"
