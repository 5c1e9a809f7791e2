"""`llmcxr serve` through gradio_client against a server on 127.0.0.1 with the quick demo's model:
report, image and VQA round trips (a JPEG and an odd-sized 16-bit PNG), the image's progress over its
codes, bad input as the page's message while the server keeps serving, and the command's one-line
errors (a checkpoint without image rows, gradio missing)."""
import asyncio
import glob
import os
import socket
import sys

import numpy as np
import pytest
from PIL import Image

from llmcxr_jax import cli


def test_the_page_serves_every_task(served, quick_demo, tmp_path, capsys):
    """One test, so that the suite's `-n 3` gives it one worker and one compiled server; each step is
    a function below. Steps: the start-up log, a round trip per task, the image's progress, bad input."""
    from gradio_client import Client

    client = Client(served.url, verbose=False)
    cxr = sorted(glob.glob(os.path.join(quick_demo.workdir, "corpus", "files", "**", "*.jpg"), recursive=True))[0]
    _startup_compiles_once_then_says_ready(served)
    _report_image_and_vqa_round_trips(client, served, cxr, _png16(cxr, str(tmp_path / "cxr16.png")))
    _image_progress_counts_the_codes(client)
    capsys.readouterr()
    _bad_input_is_a_message_and_the_server_keeps_serving(client, cxr, tmp_path)
    assert "Traceback" not in capsys.readouterr().err  # the server runs in this process's threads


def _handle(path: str):
    from gradio_client import handle_file

    return handle_file(path)


def _png16(cxr: str, path: str) -> str:
    """The JPEG as a 16-bit greyscale PNG of another size and aspect (as converted from DICOM)."""
    Image.fromarray(np.asarray(Image.open(cxr).convert("L").resize((45, 61)), np.uint16) * 257).save(path)
    assert Image.open(path).mode.startswith("I")
    return path


def _startup_compiles_once_then_says_ready(served):
    lines = served.log
    assert lines[0].startswith("loaded ") and "64 codes each" in lines[0], lines
    assert lines[1].startswith("page open at http://127.0.0.1:"), lines
    assert "Compiling the sampler for reports and answers, 1 of 2" in lines[2], lines
    assert "Compiling the sampler for images (64 codes), 2 of 2" in lines[4], lines
    assert lines[-1] == f"ready: {served.url}" and served.session.status.startswith("Ready"), lines


def _report_image_and_vqa_round_trips(client, served, cxr, png16):
    report = client.predict(_handle(cxr), 0, 1.0, api_name="/report")
    assert isinstance(report, str) and report.strip()
    # the page samples what the model samples from the same file, seed and temperature
    assert report == served.session.report(cxr, 0, 1.0, progress=lambda done, total: None)
    drawn = Image.open(client.predict("Small left pleural effusion.", 3, 0.8, api_name="/image"))
    assert drawn.format == "PNG" and drawn.size == (32, 32)
    answer = client.predict(_handle(png16), "Is there a pleural effusion?", 0, 1.0, api_name="/answer")
    assert isinstance(answer, str) and answer.strip()


def _image_progress_counts_the_codes(client):
    async def updates():
        job = client.submit("Mild cardiomegaly.", 1, 1.0, api_name="/image")
        return [u async for u in job if getattr(u, "progress_data", None)]

    shown = [p for u in asyncio.run(updates()) for p in u.progress_data]
    assert shown and all(p.unit == "codes" and p.length == 64 for p in shown), shown
    counts = [p.index for p in shown]
    assert counts == sorted(counts) and counts[-1] == 64, counts


def _bad_input_is_a_message_and_the_server_keeps_serving(client, cxr, tmp_path):
    """Each comes back as the page's error text, and the server answers the next request."""
    from gradio_client.exceptions import AppError

    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    for endpoint, args, message in [
        ("/report", (_handle(str(notes)), 0, 1.0), "notes.txt is not an image PIL can read"),
        ("/report", (None, 0, 1.0), "no image; upload a chest X-ray"),
        ("/image", ("   ", 0, 1.0), "the report is empty"),
        ("/answer", (_handle(cxr), "", 0, 1.0), "the question is empty"),
    ]:
        with pytest.raises(AppError) as e:
            client.predict(*args, api_name=endpoint)
        assert message in str(e.value) and "Traceback" not in str(e.value), (endpoint, str(e.value))
    assert client.predict(_handle(cxr), 0, 1.0, api_name="/report").strip()


def test_checkpoint_without_image_rows_is_one_line(quick_demo, tmp_path, capsys):
    pytest.importorskip("gradio", reason="gradio is not installed (pip install 'llmcxr-jax[serve]')")
    from generator_helpers import tiny_lm
    from serve_fixture import free_port

    lm0 = tiny_lm(str(tmp_path / "lm0"), os.path.join(quick_demo.workdir, "tokenizer"), 0)
    assert cli.main(["serve", "--ckpt", lm0, "--vqgan", quick_demo.vqgan, "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no image-token rows (K = 0)" in err[0], err


def test_a_taken_port_fails_before_the_model_loads(quick_demo, capsys):
    pytest.importorskip("gradio", reason="gradio is not installed (pip install 'llmcxr-jax[serve]')")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--ckpt", quick_demo.ckpt, "--vqgan", quick_demo.vqgan, "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"llmcxr serve: error: cannot listen on 127.0.0.1:{port} (") and "give another --port" in err
    assert len(err.splitlines()) == 1


def test_without_gradio_says_how_to_install(quick_demo, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError
    assert cli.main(["serve", "--ckpt", quick_demo.ckpt, "--vqgan", quick_demo.vqgan]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "llmcxr serve: error: the web demo needs gradio; pip install 'llmcxr-jax[serve]'"
