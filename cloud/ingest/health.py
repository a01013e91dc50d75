"""The ingest's liveness: what ``IngestService.health()`` reports, served on a tiny HTTP
endpoint (``GET /healthz``: 200 when alive, 503 when not, a JSON body either way) for
compose's healthcheck and any orchestrator's liveness probe.

Alive means every worker thread runs and none is stuck: a worker with messages waiting has
finished a batch, or tried one against a store that is down, within ``stall_s``. An outage
of the database or the object store is not death (restarting ingest would not end it);
the body says when the last batch went through, so an operator sees the backlog.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def serve_health(
    health: Callable[[], dict[str, Any]], *, port: int, host: str = "127.0.0.1"
) -> ThreadingHTTPServer:
    """Serve ``health()`` at ``http://host:port/healthz`` on a daemon thread (port 0: any
    free port, read it from ``server.server_address``). ``server.shutdown()`` stops it."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            if self.path.split("?")[0] not in ("/healthz", "/"):
                self.send_error(404, "try /healthz")
                return
            state = health()
            body = json.dumps(state).encode()
            self.send_response(200 if state.get("alive") else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # a probe every few seconds is not news

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="ingest-health", daemon=True).start()
    return server
