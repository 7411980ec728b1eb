"""Each example runs with one command against a real server and reports success."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_coedit_plan_example(server: object) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "coedit_plan.py"),
            "--url",
            server.url,
            "--agents",
            "4",
            "--steps",
            "3",
        ],  # type: ignore[attr-defined]
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK: no step lost or duplicated" in out.stdout
    assert "has 12 steps (expected 12)" in out.stdout
