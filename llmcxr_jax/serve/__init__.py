"""`llmcxr serve`: a web page (gradio, the `[serve]` extra) over a trained LLM-CXR. session.py is the
model side (compile once, status, requests), app.py the page, server.py starts and stops it."""
