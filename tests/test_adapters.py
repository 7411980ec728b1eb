"""Framework adapters against a live agentbus: the LangGraph store and tools (real LangGraph,
real LangChain ``ToolNode``) and the AutoGen tools and memory (real autogen-core), with the
agentbus conflict semantics surfacing through each framework's own API."""

from __future__ import annotations

import asyncio
import json
import operator
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Annotated, Any, TypedDict

import httpx
import pytest
from agentbus_autogen import AgentbusMemory
from agentbus_autogen import agentbus_tools as autogen_tools
from agentbus_langgraph import AgentbusStore, agentbus_tools, shard_key, split_key
from agentbus_sdk import AsyncClient, Client, ConflictError
from autogen_agentchat.agents import AssistantAgent
from autogen_core import CancellationToken, FunctionCall
from autogen_core.memory import MemoryContent, MemoryMimeType
from autogen_core.model_context import UnboundedChatCompletionContext
from autogen_core.models import ChatCompletionClient, CreateResult, RequestUsage, SystemMessage, UserMessage
from langchain_core.messages import AIMessage, ToolMessage
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from langgraph.store.base import BaseStore

from tests.conftest import BACKENDS, ROOT, Server, module_server


@pytest.fixture(scope="module", params=BACKENDS)
def anybus(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from module_server("adapters", request, tmp_path_factory)


@pytest.fixture(scope="module", params=["sqlite"])
def bus(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from module_server("adapters-sqlite", request, tmp_path_factory)


def new_space() -> str:
    return f"ad-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def clients(bus: Server) -> Iterator[Any]:
    """``clients(agent)`` -> a sync Client for that agent; all closed afterwards."""
    made: list[Client] = []

    def make(agent: str, session: str | None = None) -> Client:
        c = Client(bus.url, agent_id=agent, session=session)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


# --------------------------------------------------------------------------- key mapping


@pytest.mark.parametrize(
    ("namespace", "key"),
    [
        (("users", "alice"), "prefs"),
        (("a",), "b/c"),
        (("a", "b"), "c"),
        (("docs",), "history"),
        (("docs",), ""),
        (("docs",), ".."),
        (("ünï", "co de"), "k~ey %2F"),
    ],
)
def test_key_mapping_round_trips(namespace: tuple[str, ...], key: str) -> None:
    for root in ("", "memory/"):
        sk = shard_key(root, namespace, key)
        assert split_key(root, sk) == (namespace, key)
    assert shard_key("", ("users", "alice"), "prefs") == "users/alice/prefs"
    assert shard_key("", ("a",), "b/c") != shard_key("", ("a", "b"), "c")


# --------------------------------------------------------------------------- LangGraph store


def test_store_contract(anybus: Server) -> None:
    """BaseStore semantics (put/get/search/list_namespaces/delete) on every backend."""
    space = new_space()
    with Client(anybus.url, agent_id="lg-agent") as client:
        store = AgentbusStore(client, space, root="mem/")
        assert store.get(("users", "alice"), "prefs") is None
        store.put(("users", "alice"), "prefs", {"theme": "dark", "n": 1})
        store.put(("users", "alice"), "notes", {"text": "likes tea", "n": 5})
        store.put(("users", "bob"), "prefs", {"theme": "light", "n": 3})
        store.put(("docs",), "history", {"text": "reserved word as key"})
        store.put(("docs",), "a/b c", {"text": "slash and space"})

        item = store.get(("users", "alice"), "prefs")
        assert item is not None
        assert item.value == {"theme": "dark", "n": 1}
        assert item.namespace == ("users", "alice") and item.key == "prefs"
        assert item.created_at.tzinfo is not None and item.updated_at >= item.created_at
        assert store.get(("docs",), "history").value["text"] == "reserved word as key"  # type: ignore[union-attr]
        assert store.get(("docs",), "a/b c").value["text"] == "slash and space"  # type: ignore[union-attr]

        # The documented mapping: space fixed per store, root + labels joined by "/" + key.
        raw = httpx.get(f"{anybus.url}/v1/spaces/{space}/shards/mem/users/alice/prefs", headers={"X-Agent-Id": "x"})
        assert raw.status_code == 200 and raw.json()["value"] == {"theme": "dark", "n": 1}

        # Update keeps one item, bumps updated_at.
        store.put(("users", "alice"), "prefs", {"theme": "solarized", "n": 2})
        updated = store.get(("users", "alice"), "prefs")
        assert updated is not None and updated.value["theme"] == "solarized"
        assert updated.updated_at >= item.updated_at

        users = store.search(("users",))
        assert sorted((i.namespace, i.key) for i in users) == [
            (("users", "alice"), "notes"),
            (("users", "alice"), "prefs"),
            (("users", "bob"), "prefs"),
        ]
        assert [i.key for i in store.search(("users",), filter={"theme": "light"})] == ["prefs"]
        assert {i.value["n"] for i in store.search(("users",), filter={"n": {"$gte": 2}})} == {2, 3, 5}
        assert {i.value["n"] for i in store.search(("users",), filter={"n": {"$ne": 5, "$lt": 4}})} == {2, 3}
        assert len(store.search(("users",), limit=2)) == 2
        assert len(store.search(("users",), limit=2, offset=2)) == 1
        hits = store.search(("users",), query="tea")
        assert [(h.key, h.score) for h in hits] == [("notes", 1.0)]
        assert store.search(("nobody",)) == []

        assert store.list_namespaces() == [("docs",), ("users", "alice"), ("users", "bob")]
        assert store.list_namespaces(prefix=("users",)) == [("users", "alice"), ("users", "bob")]
        assert store.list_namespaces(suffix=("bob",)) == [("users", "bob")]
        assert store.list_namespaces(prefix=("users", "*")) == [("users", "alice"), ("users", "bob")]
        assert store.list_namespaces(max_depth=1) == [("docs",), ("users",)]
        assert store.list_namespaces(limit=1, offset=1) == [("users", "alice")]

        # Several ops in one batch: reads see the batch's earlier writes.
        store.delete(("users", "bob"), "prefs")
        assert store.get(("users", "bob"), "prefs") is None
        assert ("users", "bob") not in store.list_namespaces()
        # LangGraph's value=None is a delete (a tombstone on the bus), not a JSON null.
        hist = client.space(space).history("mem/users/bob/prefs")
        assert hist[0].deleted


def test_store_async_variants(bus: Server) -> None:
    space = new_space()

    async def run() -> None:
        async with AsyncClient(bus.url, agent_id="lg-async") as aclient:
            with Client(bus.url, agent_id="lg-async") as client:
                store = AgentbusStore(client, space, aclient=aclient)
                await store.aput(("team",), "plan", {"steps": ["a"]})
                item = await store.aget(("team",), "plan")
                assert item is not None and item.value == {"steps": ["a"]}
                await asyncio.gather(*(store.aput(("team", "notes"), f"n{i}", {"i": i}) for i in range(5)))
                found = await store.asearch(("team", "notes"), limit=10)
                assert sorted(i.value["i"] for i in found) == list(range(5))
                assert await store.alist_namespaces() == [("team",), ("team", "notes")]
                await store.adelete(("team",), "plan")
                assert await store.aget(("team",), "plan") is None
                # Without an AsyncClient the async methods run the sync ones in a thread.
                sync_only = AgentbusStore(client, space)
                await sync_only.aput(("team",), "x", {"ok": True})
                assert (await sync_only.aget(("team",), "x")).value == {"ok": True}  # type: ignore[union-attr]
        # connect(): a sync and an async client with one identity and session (one read set).
        both = AgentbusStore.connect(bus.url, space, agent_id="lg-both", session="s1")
        assert (await both.aget(("team",), "x")).value == {"ok": True}  # type: ignore[union-attr]
        assert both.get(("team", "notes"), "n1").value == {"i": 1}  # type: ignore[union-attr]
        assert both.client is not None
        readset = both.client.space(space).with_session("s1").readset()
        assert readset.versions() == {"team/x": 1, "team/notes/n1": 1}
        await both.aclose()

    asyncio.run(run())


def test_store_conflict_between_two_agents(clients: Any) -> None:
    """Two store instances = two agents: both read, one writes, the other's write is refused."""
    space = new_space()
    alice = AgentbusStore(clients("alice"), space)
    bob = AgentbusStore(clients("bob"), space)
    alice.put(("team",), "plan", {"steps": []})

    a_plan, b_plan = alice.get(("team",), "plan"), bob.get(("team",), "plan")
    assert a_plan is not None and b_plan is not None
    alice.put(("team",), "plan", {"steps": [*a_plan.value["steps"], "alice"]})
    with pytest.raises(ConflictError) as info:
        bob.put(("team",), "plan", {"steps": [*b_plan.value["steps"], "bob"]})
    (c,) = info.value.conflicts
    assert (c.key, c.kind, c.committed_by) == ("team/plan", "stale_read", "alice")
    assert (c.read_version, c.current_version) == (1, 2)
    # Nothing of bob's was applied; after re-reading, his write goes through.
    fresh = bob.get(("team",), "plan")
    assert fresh is not None and fresh.value == {"steps": ["alice"]}
    bob.put(("team",), "plan", {"steps": [*fresh.value["steps"], "bob"]})
    assert alice.get(("team",), "plan").value == {"steps": ["alice", "bob"]}  # type: ignore[union-attr]

    # A search is a range read: an item appearing under it makes the searcher's commit a phantom conflict.
    assert len(bob.search(("team", "tasks"))) == 0
    alice.put(("team", "tasks"), "t1", {"who": "alice"})
    with pytest.raises(ConflictError) as info:
        bob.put(("team",), "summary", {"tasks": 0})
    assert [(c.key, c.kind) for c in info.value.conflicts] == [("team/tasks/t1", "phantom")]


def test_store_transact_retries_until_no_update_is_lost(clients: Any) -> None:
    space = new_space()
    store = AgentbusStore(clients("counter"), space)
    store.put(("team",), "counter", {"n": 0, "by": []})
    attempts: list[str] = []

    def bump(name: str) -> None:
        def fn(tx: BaseStore) -> None:
            attempts.append(name)
            cur = tx.get(("team",), "counter")
            assert cur is not None
            tx.put(("team",), "counter", {"n": cur.value["n"] + 1, "by": [*cur.value["by"], name]})
            # reads inside the transaction see its own staged writes
            assert tx.get(("team",), "counter").value["n"] == cur.value["n"] + 1  # type: ignore[union-attr]

        for _ in range(5):
            store.transact(fn, max_attempts=50)

    threads = [threading.Thread(target=bump, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = store.get(("team",), "counter")
    assert final is not None and final.value["n"] == 20
    assert sorted(final.value["by"]) == sorted(f"w{i}" for i in range(4) for _ in range(5))
    assert len(attempts) >= 20


def test_store_atransact(bus: Server) -> None:
    space = new_space()

    async def run() -> None:
        async with AsyncClient(bus.url, agent_id="a1") as aclient:
            store = AgentbusStore(None, space, aclient=aclient)
            await store.aput(("t",), "list", {"items": []})

            async def add(tx: BaseStore, item: str) -> None:
                cur = await tx.aget(("t",), "list")
                await asyncio.sleep(0.01)  # let the other transactions read the same version
                await tx.aput(("t",), "list", {"items": [*cur.value["items"], item]})  # type: ignore[union-attr]

            await asyncio.gather(
                *(store.atransact(lambda tx, i=i: add(tx, f"i{i}"), max_attempts=50) for i in range(6))
            )
            final = await store.aget(("t",), "list")
            assert final is not None and sorted(final.value["items"]) == [f"i{i}" for i in range(6)]
            with pytest.raises(RuntimeError, match="AsyncClient"):
                store.get(("t",), "list")

    asyncio.run(run())


class TeamState(TypedDict, total=False):
    topic: str
    log: Annotated[list[str], operator.add]


def test_compiled_state_graph_shares_memory_through_the_store(clients: Any) -> None:
    """A real compiled StateGraph (``compile(store=...)``): two parallel nodes edit one shared
    item at the same time; the bus catches the lost update and ``transact`` redoes it."""
    space = new_space()
    store = AgentbusStore(clients("graph"), space, root="graph/")
    store.put(("team",), "notes", {"items": []})
    barrier = threading.Barrier(2, timeout=10)
    runs: list[str] = []

    def writer(name: str) -> Any:
        def node(state: TeamState, *, store: BaseStore) -> TeamState:
            def fn(tx: BaseStore) -> None:
                runs.append(name)
                cur = tx.get(("team",), "notes")
                assert cur is not None
                if runs.count(name) == 1:
                    barrier.wait()  # both nodes have read version 1 before either commits
                tx.put(("team",), "notes", {"items": [*cur.value["items"], f"{name}: {state['topic']}"]})

            store.transact(fn)  # type: ignore[attr-defined]
            return {"log": [name]}

        return node

    def summarize(state: TeamState, *, store: BaseStore) -> TeamState:
        notes = store.get(("team",), "notes")
        assert notes is not None
        store.put(("team",), "summary", {"count": len(notes.value["items"])})
        return {"log": [f"summary of {len(notes.value['items'])}"]}

    g = StateGraph(TeamState)
    g.add_node("alice", writer("alice"))
    g.add_node("bob", writer("bob"))
    g.add_node("summarize", summarize)
    g.add_edge(START, "alice")
    g.add_edge(START, "bob")
    g.add_edge(["alice", "bob"], "summarize")
    g.add_edge("summarize", END)
    graph = g.compile(store=store)

    out = graph.invoke({"topic": "launch", "log": []})
    assert out["log"][-1] == "summary of 2"
    notes = store.get(("team",), "notes")
    assert notes is not None and sorted(notes.value["items"]) == ["alice: launch", "bob: launch"]
    assert store.get(("team",), "summary").value == {"count": 2}  # type: ignore[union-attr]
    assert len(runs) == 3, runs  # one of the two had to redo its transaction after a conflict


def test_langchain_tools_in_a_tool_node(clients: Any) -> None:
    space = new_space()
    tools = agentbus_tools(space, clients("tool-agent"))
    other = clients("other-agent").space(space)
    assert [t.name for t in tools] == ["read_shard", "list_shards", "commit_shard"]
    g = StateGraph(MessagesState)
    g.add_node("tools", ToolNode(tools))
    g.add_edge(START, "tools")
    g.add_edge("tools", END)
    graph = g.compile()

    def call(name: str, **args: Any) -> str:
        msg = AIMessage(content="", tool_calls=[{"name": name, "args": args, "id": uuid.uuid4().hex}])
        out = graph.invoke({"messages": [msg]})
        tm = out["messages"][-1]
        assert isinstance(tm, ToolMessage)
        return str(tm.content)

    assert call("read_shard", key="plan").startswith("NOT FOUND")
    assert call("commit_shard", key="plan", value='{"steps": ["a"]}').startswith("OK: wrote 'plan', now version 1")
    assert '"steps": ["a"]' in call("read_shard", key="plan")
    other.commit({"plan": {"steps": ["a", "b"]}})
    text = call("commit_shard", key="plan", value='{"steps": ["a", "c"]}')
    assert text.startswith("CONFLICT: nothing was written")
    assert "plan: you read v1, it is now v2 by other-agent" in text
    assert "plan v2 (by other-agent)" in call("list_shards", prefix="")
    assert call("commit_shard", key="note", value="plain text").startswith("OK")
    assert other.get("note").value == "plain text"  # type: ignore[union-attr]
    assert call("commit_shard", key="note", delete=True).startswith("OK: deleted")


# --------------------------------------------------------------------------- AutoGen


def test_autogen_tools_run_json_and_conflict_as_text(bus: Server) -> None:
    space = new_space()

    async def run() -> None:
        async with AsyncClient(bus.url, agent_id="ag-1") as me, AsyncClient(bus.url, agent_id="ag-2") as them:
            read, listing, commit = autogen_tools(space, me)
            tok = CancellationToken()
            assert (await read.run_json({"key": "plan"}, tok)).startswith("NOT FOUND")
            ok = await commit.run_json({"key": "plan", "value": '{"steps": []}'}, tok)
            assert ok.startswith("OK: wrote 'plan', now version 1"), ok
            assert '"version": 1' in await read.run_json({"key": "plan"}, tok)
            await them.space(space).commit({"plan": {"steps": ["theirs"]}})
            text = await commit.run_json({"key": "plan", "value": '{"steps": ["mine"]}'}, tok)
            assert text.startswith("CONFLICT") and "plan: you read v1, it is now v2 by ag-2" in text
            assert commit.return_value_as_string(text) == text
            assert "plan v2 (by ag-2)" in await listing.run_json({"prefix": "pl"}, tok)
            # expected_version=0 means "must not exist"
            text = await commit.run_json({"key": "plan", "value": "x", "expected_version": 0}, tok)
            assert "expected_version did not match" in text
            assert read.schema["parameters"]["required"] == ["key"]
            # A sync Client works too (its calls run in a thread).
            with Client(bus.url, agent_id="ag-3") as sync:
                (sread, _, _) = autogen_tools(space, sync)
                assert '"theirs"' in await sread.run_json({"key": "plan"}, tok)

    asyncio.run(run())


def test_autogen_memory_add_query_update_context(bus: Server) -> None:
    space = new_space()

    async def run() -> None:
        async with AsyncClient(bus.url, agent_id="mem-a") as a, AsyncClient(bus.url, agent_id="mem-b") as b:
            mem_a = AgentbusMemory(a, space, prefix="memory/team/")
            mem_b = AgentbusMemory(b, space, prefix="memory/team/", context_limit=2)
            await mem_a.add(MemoryContent(content="The launch is on Friday", mime_type=MemoryMimeType.TEXT))
            await mem_b.add(
                MemoryContent(content={"fact": "budget is 10k"}, mime_type=MemoryMimeType.JSON, metadata={"src": "b"})
            )
            await mem_a.add(MemoryContent(content=b"\x00\x01", mime_type=MemoryMimeType.BINARY))
            # Both agents see all entries (shared memory), in order.
            every = (await mem_b.query("")).results
            assert [m.content for m in every] == ["The launch is on Friday", {"fact": "budget is 10k"}, b"\x00\x01"]
            assert every[1].metadata["src"] == "b" and every[1].metadata["updated_by"] == "mem-b"  # type: ignore[index]
            hits = (await mem_a.query("when is the launch")).results
            assert hits[0].content == "The launch is on Friday" and hits[0].metadata["score"] > 0  # type: ignore[index]
            assert (await mem_a.query("budget")).results[0].content == {"fact": "budget is 10k"}
            assert (await mem_a.query("zebra")).results == []

            ctx = UnboundedChatCompletionContext()
            await ctx.add_message(UserMessage(content="Plan the launch", source="user"))
            res = await mem_b.update_context(ctx)
            assert len(res.memories.results) == 2  # context_limit: the newest two
            msgs = await ctx.get_messages()
            assert isinstance(msgs[-1], SystemMessage) and "budget is 10k" in msgs[-1].content

            # The memory's reads never enter the agent's own read set (it has a session of its own).
            assert (await a.space(space).readset()).reads == []

            await mem_a.clear()
            assert (await mem_b.query("")).results == []
            await mem_a.close()

    asyncio.run(run())


class ScriptedModel(ChatCompletionClient):
    """A ChatCompletionClient that answers from a script and records what it was sent
    (autogen-ext's model clients are not installed here, and the point is the adapters)."""

    def __init__(self, script: list[Any], before: dict[int, Any] | None = None) -> None:
        self.script = script
        self.before = before or {}  # call index -> coroutine function awaited before answering
        self.seen: list[list[Any]] = []

    async def create(self, messages: Any, **kwargs: Any) -> CreateResult:
        if len(self.seen) in self.before:
            await self.before[len(self.seen)]()
        self.seen.append(list(messages))
        content = self.script.pop(0)
        reason = "function_calls" if isinstance(content, list) else "stop"
        return CreateResult(finish_reason=reason, content=content, usage=RequestUsage(0, 0), cached=False)

    def create_stream(self, messages: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    async def close(self) -> None:
        pass

    def actual_usage(self) -> RequestUsage:
        return RequestUsage(0, 0)

    def total_usage(self) -> RequestUsage:
        return RequestUsage(0, 0)

    def count_tokens(self, messages: Any, **kwargs: Any) -> int:
        return 0

    def remaining_tokens(self, messages: Any, **kwargs: Any) -> int:
        return 100_000

    @property
    def capabilities(self) -> Any:
        return {"vision": False, "function_calling": True, "json_output": False}

    @property
    def model_info(self) -> Any:
        return {
            "vision": False,
            "function_calling": True,
            "json_output": False,
            "family": "unknown",
            "structured_output": False,
        }


def test_autogen_assistant_agent_uses_the_tools_and_memory(bus: Server) -> None:
    """A real ``AssistantAgent``: the shared memory reaches the model's context, and the
    model's tool calls go through agentbus (a conflict comes back to it as text)."""
    space = new_space()

    async def run() -> None:
        async with AsyncClient(bus.url, agent_id="assistant") as me, AsyncClient(bus.url, agent_id="rival") as rival:
            memory = AgentbusMemory(rival, space, prefix="memory/")
            await memory.add(MemoryContent(content="The plan lives in shard 'plan'", mime_type=MemoryMimeType.TEXT))
            await rival.space(space).commit({"plan": {"steps": ["design"]}})

            async def rival_edits() -> None:  # between the agent's read and its commit
                await rival.space(space).commit({"plan": {"steps": ["design", "rival"]}})

            model = ScriptedModel(
                [
                    [FunctionCall(id="1", name="read_shard", arguments=json.dumps({"key": "plan"}))],
                    [FunctionCall(id="2", name="commit_shard", arguments=json.dumps({"key": "plan", "value": "{}"}))],
                    "done",
                ],
                before={1: rival_edits},
            )
            agent = AssistantAgent(
                "assistant",
                model_client=model,
                tools=autogen_tools(space, me),  # type: ignore[arg-type]
                memory=[AgentbusMemory(me, space, prefix="memory/")],
                reflect_on_tool_use=False,
                max_tool_iterations=3,
            )
            result = await agent.run(task="Add a step to the plan")
            first_context = model.seen[0]
            assert any("The plan lives in shard 'plan'" in str(m.content) for m in first_context)
            outputs = [str(m.content) for m in result.messages]
            assert any('"steps": ["design"]' in o for o in outputs), outputs
            assert any(
                "CONFLICT: nothing was written" in o and "you read v1, it is now v2 by rival" in o for o in outputs
            ), outputs
            assert (await rival.space(space).read("plan")).value == {"steps": ["design", "rival"]}

    asyncio.run(run())


# --------------------------------------------------------------------------- packaging


@pytest.mark.parametrize(
    ("blocked", "module"),
    [
        ("langgraph", "agentbus_autogen"),
        ("autogen_core", "agentbus_langgraph"),
        ("autogen_agentchat", "agentbus_langgraph"),
    ],
)
def test_adapters_import_without_the_other_framework(blocked: str, module: str) -> None:
    code = f"import sys; sys.modules[{blocked!r}] = None; import {module}; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
