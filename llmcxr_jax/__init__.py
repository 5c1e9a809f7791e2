"""llmcxr-jax: LLM-CXR (instruction-tuned LLM that reads and writes chest X-rays) in JAX/Flax.

`from llmcxr_jax import Generator` gives api.Generator; it is imported on first use, so importing the
package stays cheap."""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Generator":
        from llmcxr_jax.api import Generator

        return Generator
    raise AttributeError(f"module 'llmcxr_jax' has no attribute {name!r}")
