"""Install llmcxr-jax: `pip install -c requirements-lock.txt -e .[test]`."""
from setuptools import find_packages, setup

setup(
    name="llmcxr-jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of LLM-CXR (instruction-tuned LLM that reads and writes chest X-rays)",
    packages=find_packages(include=["llmcxr_jax", "llmcxr_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2,<0.11",
        "jaxlib>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "ml-collections>=1.1.0,<2",
        "numpy>=1.26",
        "ml_dtypes>=0.5",
        "safetensors>=0.4",
        "tokenizers>=0.21",
        "tqdm>=4.66",
        "pyyaml>=6",
        "pillow>=10",
        "array_record>=0.8",
        "tensorflow-datasets>=4.9.10,<5",  # builder + data_source only; no TensorFlow needed
        "scipy>=1.11",  # FID's matrix square root (scipy.linalg.sqrtm, as pytorch-fid)
        "scikit-learn>=1.4",  # F1 / precision / recall / Jaccard / AUROC
        "pycocoevalcap==1.2",  # BLEU-1..4 / ROUGE-L / CIDEr-D scorers
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "torch>=2.4",
            "transformers>=5.0,<6",
            "diffusers>=0.35",
            "einops>=0.7",
            "pyyaml>=6",
            "tensorboard>=2.16",  # only to check that our event files parse with TensorBoard's protos
            "scikit-image>=0.22",  # SSIM reference
            "ruff>=0.6",  # lint (pyproject.toml [tool.ruff]); .ci/run runs it before the tests
            "import-linter>=2.1",  # layer contract (pyproject.toml [tool.importlinter])
        ],
        "tpu": ["libtpu==0.0.42.*"],
        "gcs": ["gcsfs", "google-cloud-storage"],  # gs:// workdirs (etils.epath and orbax)
    },
    entry_points={"console_scripts": ["llmcxr=llmcxr_jax.cli.main:main"]},
)
