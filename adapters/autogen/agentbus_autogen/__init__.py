"""AutoGen integration for agentbus (being built)."""
