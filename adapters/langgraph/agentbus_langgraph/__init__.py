"""LangGraph integration for agentbus: a ``BaseStore`` over agentbus shards (with conflict
detection) and LangChain tools for agents. Depends on ``agentbus_sdk`` and ``langgraph`` only."""

from agentbus_langgraph.keys import namespace_prefix, shard_key, split_key
from agentbus_langgraph.store import AgentbusStore
from agentbus_langgraph.tools import agentbus_tools, conflict_text

__all__ = ["AgentbusStore", "agentbus_tools", "conflict_text", "namespace_prefix", "shard_key", "split_key"]
