"""The layering the import-linter contracts state, checked where it matters at run time: the controller
process never loads torch, and the contracts themselves hold."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_importing_the_controller_leaves_torch_out():
    code = (
        "import sys, controlplane.controller, controlplane.cli.fpctl, controlplane.actor_host; "
        "print(sorted(m for m in ('torch', 'transformers', 'safetensors', 'dataplane') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_import_contracts_hold():
    result = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
