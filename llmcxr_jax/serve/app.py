"""The `llmcxr serve` page in gradio: a status line (compiling ... / ready), and three tabs, CXR ->
report, report -> CXR and CXR + question -> answer, each with a progress bar fed by the sampler's
own steps. Bad input is the page's error message; the server keeps serving. Imported only once
gradio is known to be installed (serve/server.py)."""
from __future__ import annotations

import contextvars
import functools
import time
from collections.abc import Callable

import gradio as gr
from PIL import UnidentifiedImageError

from llmcxr_jax import api
from llmcxr_jax.errors import UsageError
from llmcxr_jax.serve.session import Session

# Fonts every machine has: the default theme fetches Inter from Google Fonts, and nothing here downloads.
THEME = gr.themes.Default(font=("ui-sans-serif", "system-ui", "sans-serif"),
                          font_mono=("ui-monospace", "SFMono-Regular", "monospace"))
UPLOAD_LABEL = "Chest X-ray (JPEG / PNG, 8 or 16 bit)"
PROGRESS_EVERY_S = 0.1  # the sampler reports every token; the page needs ten updates a second at most


def _upload(elem_id: str) -> gr.Image:
    """An upload box that hands the uploaded file on untouched (a 16-bit PNG stays 16-bit) and turns a
    file PIL cannot open into the page's error message rather than a traceback. Its preprocess is
    wrapped on the instance: a subclass of a gradio component makes gradio write a .pyi beside it."""
    box = gr.Image(type="filepath", image_mode=None, sources=["upload"], label=UPLOAD_LABEL, elem_id=elem_id)
    read = box.preprocess

    @functools.wraps(read)
    def preprocess(payload):
        try:
            return read(payload)
        except (UnidentifiedImageError, OSError) as e:
            name = getattr(payload, "orig_name", None) or "the upload"
            raise gr.Error(f"{name} is not an image PIL can read ({type(e).__name__}); upload a JPEG or PNG",
                           print_exception=False) from None

    box.preprocess = preprocess
    return box


def _on_page(fn: Callable[[], object]):
    """fn's result; a UsageError (bad input) becomes the page's error message, without a traceback."""
    try:
        return fn()
    except UsageError as e:
        raise gr.Error(str(e), print_exception=False) from None


def _listener(progress: gr.Progress, desc: str, unit: str) -> api.Progress:
    """Forward the sampler's step reports (XLA's callback thread) to this request's progress bar,
    in the request's context, where gradio finds which page to update."""
    context = contextvars.copy_context()
    last = [0.0]

    def tell(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < PROGRESS_EVERY_S:
            return
        last[0] = now
        context.run(progress, (done, total), desc=desc, unit=unit)

    return tell


def build(session: Session) -> gr.Blocks:
    """The page over `session`; its endpoints (/report, /image, /answer) are what gradio_client calls."""
    g = session.generator
    n = g.codes_per_image
    # gradio's way: a parameter whose default is a gr.Progress gets the request's progress bar

    def report(image, seed, temperature, progress=gr.Progress()):  # noqa: B008
        return _on_page(lambda: session.report(image, seed, temperature,
                                               _listener(progress, "writing the report (stops at its end)", "tokens")))

    def draw(text, seed, temperature, progress=gr.Progress()):  # noqa: B008
        return _on_page(lambda: session.draw(text, seed, temperature,
                                             _listener(progress, f"drawing {n} image codes", "codes")))

    def answer(image, question, seed, temperature, progress=gr.Progress()):  # noqa: B008
        return _on_page(lambda: session.answer(image, question, seed, temperature,
                                               _listener(progress, "answering (stops at its end)", "tokens")))

    def knobs():
        return (gr.Number(0, label="seed", precision=0, minimum=0),
                gr.Slider(0.1, 1.5, value=1.0, step=0.05, label="temperature (LLM-CXR: 1.0; top_p 0.92)"))

    with gr.Blocks(title="LLM-CXR", analytics_enabled=False) as page:
        gr.Markdown(f"# LLM-CXR\nA chest X-ray model that reads and draws {g.resolution} px images "
                    f"({n} VQ-GAN codes each). Outputs are samples from a research model, not a diagnosis.")
        status = gr.Markdown(f"**Status:** {session.status}", elem_id="status")
        buttons = []
        with gr.Tab("CXR -> report"):
            with gr.Row():
                image_in = _upload("report-image")
                with gr.Column():
                    seed, temperature = knobs()
                    button = gr.Button("Write the report", variant="primary", interactive=False,
                                       elem_id="report-button")
                    text_out = gr.Textbox(label="report", lines=6, elem_id="report-text")
            button.click(report, [image_in, seed, temperature], text_out, api_name="report", concurrency_id="model")
            buttons.append(button)
        with gr.Tab("report -> CXR"):
            with gr.Row():
                with gr.Column():
                    text_in = gr.Textbox(label="report (findings / impression)", lines=5, elem_id="image-report")
                    seed, temperature = knobs()
                    button = gr.Button("Draw the CXR", variant="primary", interactive=False, elem_id="image-button")
                image_out = gr.Image(label=f"drawn CXR ({g.resolution} px)", type="numpy", format="png",
                                     interactive=False, elem_id="image-out")
            button.click(draw, [text_in, seed, temperature], image_out, api_name="image", concurrency_id="model")
            buttons.append(button)
        with gr.Tab("VQA"):
            with gr.Row():
                vqa_image = _upload("vqa-image")
                with gr.Column():
                    question = gr.Textbox(label="question", info="for example: Is there a pleural effusion?",
                                          elem_id="vqa-question")
                    seed, temperature = knobs()
                    button = gr.Button("Answer", variant="primary", interactive=False, elem_id="vqa-button")
                    answer_out = gr.Textbox(label="answer", lines=3, elem_id="vqa-answer")
            button.click(answer, [vqa_image, question, seed, temperature], answer_out, api_name="answer",
                         concurrency_id="model")
            buttons.append(button)

        def poll():
            ready = session.ready.is_set()
            return (f"**Status:** {session.status}", *(gr.Button(interactive=ready) for _ in buttons),
                    gr.Timer(active=not ready))

        timer = gr.Timer(1.0)
        outputs = [status, *buttons, timer]
        page.load(poll, None, outputs, show_progress="hidden", api_visibility="private", queue=False)
        timer.tick(poll, None, outputs, show_progress="hidden", api_visibility="private", queue=False)
    return page
