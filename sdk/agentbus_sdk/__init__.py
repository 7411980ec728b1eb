"""Python client for agentbus (being built)."""
