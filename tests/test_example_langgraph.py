"""examples/langgraph_team.py runs end to end: a LangGraph team sharing state through agentbus,
calling the real local model (llama.cpp, gemma3 270m) through the agentbus broker, with a
concurrent edit caught as a conflict and retried."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.llama import MODEL_NAME
from tests.upstream import FakeUpstream

EXAMPLE = ROOT / "examples" / "langgraph_team.py"


def check(out: subprocess.CompletedProcess[str]) -> str:
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "OK: both writers' notes are in the plan" in out.stdout, text
    assert "CONFLICT on team/plan: I read v1, it is now v2" in out.stdout, text
    assert "history of team/plan: v1 by planner, v2 by writer-" in out.stdout, text
    assert "1 conflict(s) caught and retried" in out.stdout, text
    return text


def test_langgraph_team_with_the_real_model() -> None:
    """The one-command mode: the example starts the local model server (the venv that
    ``make model-server`` builds) and its own agentbus whose broker points at it."""
    from tests.conftest import unavailable
    from tests.llama import LLAMA_PY, LLAMA_VENV

    if not LLAMA_PY.exists():
        unavailable(f"the llama.cpp server venv ({LLAMA_VENV}; build it with `make model-server`)")
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--model", MODEL_NAME, "--max-tokens", "32"],
        capture_output=True,
        text=True,
        timeout=1200,  # a 270m model on two loaded cores: a few seconds per call, sometimes far more
        cwd=ROOT,
    )
    text = check(out)
    assert "started the local model server" in text
    assert "started an embedded agentbus" in text
    # 6 calls: planner, two writers, the redo of the one that conflicted, reviewer.
    assert "; 5 model calls" in out.stdout or "; 6 model calls" in out.stdout, text


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_langgraph_team_against_a_running_bus(server_factory: Any) -> None:
    """``--bus URL`` mode against a running agentbus (a deterministic fake model behind its broker)."""
    fake = FakeUpstream("fake", models=[MODEL_NAME], completion_words=6).start()
    try:
        srv = server_factory(broker_endpoints=json.dumps([fake.endpoint()]))
        out = subprocess.run(
            [sys.executable, str(EXAMPLE), "--bus", srv.url, "--model", MODEL_NAME],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
        check(out)
        calls = [r for r in fake.requests if r["path"].endswith("/completions")]
        assert len(calls) == 5  # planner, writer-a, writer-b, the redo, reviewer
        assert {r["headers"].get("x-agent-id") for r in calls} >= {"planner", "writer-a", "writer-b", "reviewer"}
    finally:
        fake.stop()
