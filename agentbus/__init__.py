"""agentbus: shared, validated state and an accountable model gateway for LLM agents."""

__version__ = "0.1.0"
