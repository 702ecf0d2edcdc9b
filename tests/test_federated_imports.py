"""The federated core imports without Lightning (DESIGN.md: the maths stays framework-free)."""

from __future__ import annotations

import subprocess
import sys


def test_core_imports_with_lightning_blocked() -> None:
    code = (
        "import sys\n"
        "sys.modules['lightning'] = None\n"
        "sys.modules['pytorch_lightning'] = None\n"
        "import privtune.prompts, privtune.federated, privtune.federated.report\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"
