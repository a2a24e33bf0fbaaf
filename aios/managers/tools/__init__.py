"""The runtime under the `tools` manager: discovery, validation, isolated execution, MCP mounting.

Modules: manifest (tool.toml model), registry (discovery, ToolInfo, argument validation),
jail + worker (stdlib-only code that runs in the confined worker process), sandbox
(isolation detection, worker processes, warm pool), mcp_source (MCP servers over stdio),
runtime (ToolRuntime, the API the manager calls).
"""
