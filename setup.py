"""Install llmcxr-jax: `bash install.sh` (the tested set), or `pip install ".[interop]"` for the demo.

configs/ stays at the top of the checkout (commands, tests and launch scripts name `configs/...`);
a wheel also ships it as package data, llmcxr_jax/configs_files/, so an installed `llmcxr demo`
finds its config (llmcxr_jax.configs.shipped_config). Nothing imports configs_files as a module.
"""
from setuptools import find_packages, setup

INTEROP = [  # convert/ and the demo's PyTorch check: exports reloaded in transformers / diffusers
    "torch>=2.4",  # install.sh takes the CPU build (requirements-lock.txt's torch, TORCH_INDEX_URL)
    "transformers>=5.0,<6",
    "diffusers>=0.35",
    "pyyaml>=6",  # taming model YAMLs (llmcxr import-vqgan --taming-config)
]
TFDS = ["tensorflow-datasets>=4.9.10,<5"]  # data/tfds_mimic_cxr.py: builder + data_source; no TensorFlow
SERVE = ["gradio>=6.31,<7"]  # `llmcxr serve`: the web demo (gradio brings gradio-client)

setup(
    name="llmcxr-jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of LLM-CXR (instruction-tuned LLM that reads and writes chest X-rays)",
    license_expression="Apache-2.0",  # PEP 639: License-Expression in the metadata
    license_files=["LICENSE"],
    packages=find_packages(include=["llmcxr_jax", "llmcxr_jax.*"]) + ["llmcxr_jax.configs_files"],
    package_dir={"llmcxr_jax.configs_files": "configs"},
    package_data={"llmcxr_jax.configs_files": ["*.py", "ablations/*.py"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2,<0.11",
        "jaxlib>=0.10.2,<0.11",  # jax 0.10.2 also takes jaxlib 0.10.1; 0.10.2 is the tested one
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "array_record>=0.8",  # data/codes.py's shards
        "absl-py>=2",  # grain's worker flags (distributed.py: mark_absl_flags_parsed)
        "etils[epath]>=1.7",  # storage.py / vocab.py: local and gs:// paths
        "ml-collections>=1.1.0,<2",
        "numpy>=1.26",
        "safetensors>=0.4",
        "tokenizers>=0.21",
        "tqdm>=4.66",
        "pillow>=10",
        "scipy>=1.11",  # FID's matrix square root (scipy.linalg.sqrtm, as pytorch-fid)
        "scikit-learn>=1.4",  # F1 / precision / recall / Jaccard / AUROC
        "pycocoevalcap==1.2",  # BLEU-1..4 / ROUGE-L / CIDEr-D scorers
        "tensorboardX>=2.6.5,<3",  # TensorBoard scalars, image grids and text from train, train-vqgan, evaluate
    ],
    extras_require={
        "interop": INTEROP,
        "tfds": TFDS,
        "serve": SERVE,
        "test": INTEROP + TFDS + SERVE + [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "einops>=0.7",
            "tensorboard>=2.16",  # TensorBoard's own reader lists what our writers logged
            "playwright>=1.50",  # drives Debian's chromium (install.sh) for the web demo's browser test
            "scikit-image>=0.22",  # SSIM reference
            "omegaconf==2.3.0",  # what LLM-CXR pins: its YAML loading, to build taming's VQModel from our exports
            "ruff>=0.6",  # lint (pyproject.toml [tool.ruff]); .ci/run runs it before the tests
            "import-linter>=2.1",  # layer contract (pyproject.toml [tool.importlinter])
        ],
        "tpu": ["libtpu==0.0.42.*"],
        "gcs": ["gcsfs", "google-cloud-storage"],  # gs:// workdirs (etils.epath and orbax)
    },
    entry_points={"console_scripts": ["llmcxr=llmcxr_jax.cli.main:main"]},
)
