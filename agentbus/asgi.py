"""ASGI entry point for uvicorn workers: ``uvicorn agentbus.asgi:app``."""

from agentbus.app import create_app

app = create_app()
