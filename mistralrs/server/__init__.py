"""OpenAI-compatible HTTP server over one `Runner` (see docs/server.md).

`create_app(runner, config)` builds the ASGI app; `serve(runner, config, host=, port=)` runs it in the
foreground with uvicorn; `BackgroundServer(runner)` runs it on a background thread.
"""

from mistralrs.server.app import ServerConfig, create_app
from mistralrs.server.serve import BackgroundServer, serve

__all__ = ["BackgroundServer", "ServerConfig", "create_app", "serve"]
