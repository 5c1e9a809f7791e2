"""llmcxr-jax: LLM-CXR (instruction-tuned LLM that reads and writes chest X-rays) in JAX/Flax."""

__version__ = "0.1.0"
