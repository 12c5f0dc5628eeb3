"""The CPU stages' contract with their workers: importing them loads no torch."""

from __future__ import annotations

import subprocess
import sys


def test_cpu_stage_workers_import_neither_torch_nor_matplotlib():
    probe = ("import sys, spade_batch.engine.cpu_stages; "
             "print(sorted(m for m in ('torch', 'torchvision', 'matplotlib', 'faiss') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
