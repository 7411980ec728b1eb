"""agentbus as an MCP server (official ``mcp`` SDK).

One implementation of the tools (:func:`agentbus.mcp.server.build_server`), written against
the bus's own HTTP API through an ``httpx.AsyncClient``, so MCP callers get exactly the
identity, read-set and conflict semantics of HTTP callers:

* mounted at ``/mcp`` on the agentbus app (streamable HTTP, bearer auth), calling the same
  app in-process (:class:`agentbus.mcp.server.McpMount`);
* over stdio against a remote bus: ``agentbus mcp --url http://127.0.0.1:8080``.

Nothing is imported here, so ``agentbus --help`` does not load the MCP SDK.
"""
