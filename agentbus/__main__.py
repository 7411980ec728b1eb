from agentbus.cli import app

app()
