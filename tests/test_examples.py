"""Each example runs with one command against a real server and reports success."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.llama import MODEL_NAME, llama_server  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_coedit_plan_example(server: object) -> None:
    url = server.url  # type: ignore[attr-defined]
    out = run_example("coedit_plan.py", "--url", url, "--agents", "4", "--steps", "3")
    assert "OK: no step lost or duplicated" in out.stdout
    assert "has 12 steps (expected 12)" in out.stdout


def test_budget_and_routing_example_with_stand_in_models() -> None:
    # Starts its own bus (SQLite, auth on) and two stand-in model servers.
    out = run_example("budget_and_routing.py")
    assert "OK: " in out.stdout and "then BudgetExceeded stopped the agent" in out.stdout
    assert "-> endpoint standard (rule says standard)" in out.stdout
    assert "-> endpoint premium (rule says premium)" in out.stdout
    assert "429 BudgetExceeded (code=budget_exceeded, limit=tokens" in out.stdout


def test_budget_and_routing_example_with_a_real_model(llama_server: str) -> None:  # noqa: F811
    out = run_example(
        "budget_and_routing.py", "--upstream", llama_server, "--model", MODEL_NAME, "--budget", "80", timeout=300
    )
    assert "OK: " in out.stdout and "429 BudgetExceeded" in out.stdout
