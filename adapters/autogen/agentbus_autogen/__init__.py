"""AutoGen (autogen-agentchat / autogen-core 0.7) integration for agentbus: ``FunctionTool``s
over a space and a shared ``Memory``. Depends on ``agentbus_sdk`` and AutoGen only."""

from agentbus_autogen.memory import AgentbusMemory
from agentbus_autogen.tools import agentbus_tools, conflict_text

__all__ = ["AgentbusMemory", "agentbus_tools", "conflict_text"]
