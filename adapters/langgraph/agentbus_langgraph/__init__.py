"""LangGraph integration for agentbus (being built)."""
