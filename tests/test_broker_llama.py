"""The broker against a real model server: llama.cpp's OpenAI-compatible server with a tiny
real model. Completions, streaming and usage accounting go through agentbus end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from tests.llama import MODEL_NAME, llama_server  # noqa: F401 - fixture
from tests.upstream import FakeUpstream

pytestmark = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)

ADMIN = "ab_llama-test-admin-token-000000000000000000000"


@pytest.fixture
def fake() -> Any:
    up = FakeUpstream("fake", models=[MODEL_NAME]).start()
    yield up
    up.stop()


@pytest.fixture
def broker(server_factory: Any, llama_server: str, fake: FakeUpstream, tmp_path: Path) -> Any:  # noqa: F811
    cfg = {
        "endpoints": [
            {"name": "llama", "base_url": llama_server, "models": [MODEL_NAME], "timeout_s": 120},
            fake.endpoint(),
        ],
        "aliases": {"tiny": MODEL_NAME},
        # Requests saying "quick" go to the fake endpoint; everything else to the real model.
        "routes": [
            {"name": "quick", "when": {"keywords": ["quick"]}, "targets": ["fake"]},
            {"name": "real", "targets": ["llama"]},
        ],
        "prices": {MODEL_NAME: {"input_per_1k": 1.0, "output_per_1k": 2.0}},
    }
    path = tmp_path / "broker.yaml"
    path.write_text(yaml.safe_dump(cfg))
    srv = server_factory(auth="true", bootstrap_admin_token=ADMIN, broker_config=str(path), auth_cache_ttl_s="0")
    r = httpx.post(
        f"{srv.url}/v1/admin/tokens",
        headers={"Authorization": f"Bearer {ADMIN}"},
        json={"subject": "writer-agent"},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    return srv, {"Authorization": f"Bearer {r.json()['token']}"}


def used(srv: Any, headers: dict[str, str]) -> dict[str, Any]:
    body = httpx.get(f"{srv.url}/v1/budget", headers=headers, timeout=10).json()
    return body["scopes"]["p:default/writer-agent"]["used"]


def test_completion_through_broker_is_real_and_accounted(broker: Any) -> None:
    srv, h = broker
    r = httpx.post(
        f"{srv.url}/v1/completions",
        headers=h,
        json={"model": "tiny", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-agentbus-endpoint"] == "llama"
    body = r.json()
    text = body["choices"][0]["text"]
    assert isinstance(text, str) and text.strip(), body
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 12
    u = used(srv, h)
    assert u["requests"] == 1
    assert u["tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    expected_cost = (usage["prompt_tokens"] * 1.0 + usage["completion_tokens"] * 2.0) / 1000
    assert u["cost"] == pytest.approx(expected_cost)


def test_streaming_completion_through_broker(broker: Any) -> None:
    srv, h = broker
    events: list[Any] = []
    with httpx.stream(
        "POST",
        f"{srv.url}/v1/completions",
        headers=h,
        json={"model": "tiny", "prompt": "One, two, three,", "max_tokens": 10, "stream": True, "temperature": 0},
        timeout=120,
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0].get("text", "") for c in chunks if c.get("choices"))
    assert text.strip()
    # The broker asked upstream for usage and stripped that chunk: the client did not ask.
    assert all(c.get("choices") for c in chunks)
    u = used(srv, h)
    assert u["requests"] == 1 and u["tokens"] > 0 and u["inflight"] == 0


def test_chat_completion_and_routing_between_real_and_fake(broker: Any, fake: FakeUpstream) -> None:
    srv, h = broker
    real = httpx.post(
        f"{srv.url}/v1/chat/completions",
        headers=h,
        json={"model": "tiny", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8},
        timeout=120,
    )
    assert real.status_code == 200, real.text
    assert real.headers["x-agentbus-endpoint"] == "llama"
    assert real.json()["choices"][0]["message"]["role"] == "assistant"
    quick = httpx.post(
        f"{srv.url}/v1/chat/completions",
        headers=h,
        json={"model": "tiny", "messages": [{"role": "user", "content": "a quick one please"}], "max_tokens": 8},
        timeout=30,
    )
    assert quick.status_code == 200 and quick.headers["x-agentbus-endpoint"] == "fake"
    # The real server saw the served model name, and the fake one the caller's identity.
    assert fake.requests[-1]["body"]["model"] == MODEL_NAME
    assert fake.requests[-1]["headers"]["x-agent-id"] == "writer-agent"
