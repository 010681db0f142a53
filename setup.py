"""stride-jax: STRIDE training-data attribution in JAX/Flax NNX."""

from pathlib import Path

from setuptools import find_packages, setup

_REQS = [
    line.strip()
    for line in (Path(__file__).parent / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="stride-jax",
    version="0.1.0",
    description="Steering-based Training Data Influence Decomposition (STRIDE) in JAX",
    long_description=(Path(__file__).parent / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["stride_jax", "stride_jax.*", "experiments", "experiments.*"]),
    python_requires=">=3.11",
    install_requires=_REQS,
    extras_require={
        # Language models: HF config.json + safetensors import/export, GGUF reading, HF
        # tokenizers, the chit-chat SFT dialogues. Without them every classifier path works and
        # a language-model feature says `pip install -e ".[lm]"`.
        "lm": [
            "transformers>=5.24.0,<6",
            "tokenizers>=0.23.3",
            "safetensors>=0.8.0",
            "gguf>=0.19.0",
            "chitchat-dataset>=0.9.0",
        ],
        # What the test suite needs beside the `lm` extra (README: `pip install -e ".[lm,test]"`).
        # torch (CPU wheel) only for parity tests against transformers' PyTorch models.
        # pytest-xdist: the default suite runs in 2 worker processes (pyproject addopts).
        # ruff is exact: another version formats differently.
        # nbclient, nbformat, ipykernel: tests/test_notebooks.py runs the Colab notebooks in a
        # "python3" kernel (ipykernel installs that kernelspec into the environment).
        "test": [
            "pytest>=9.0.3",
            "pytest-xdist>=3.8.0",
            "execnet>=2.1.2",
            "ruff==0.17.6",
            "torch==2.13.0",
            "nbclient>=0.11.0",
            "nbformat>=5.11.1",
            "ipykernel>=7.4.0",
        ],
        # Optional cross-check of TRAK against MadryLab's traker (tests/test_trak_crosscheck.py).
        "crosscheck": ["torch==2.13.0", "traker==0.3.2"],
    },
)
