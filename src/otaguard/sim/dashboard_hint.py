"""Where the demo's dashboard is, and keeping the demo's server up to look at it."""

from __future__ import annotations

import threading

from rich.console import Console

from otaguard.server import RunningServer
from otaguard.server.auth import OPERATOR_TOKEN_FILE
from otaguard.server.dashboard import DASHBOARD_PATH

__all__ = ["dashboard_line", "serve_until_interrupted"]


def dashboard_line(server: RunningServer) -> str:
    """``dashboard: URL (operator token in FILE)`` for a running server."""
    token_file = server.data_dir / OPERATOR_TOKEN_FILE
    return f"dashboard: {server.base_url}{DASHBOARD_PATH} (operator token in {token_file})"


def serve_until_interrupted(console: Console, server: RunningServer) -> None:
    """Print the dashboard's address and block until Ctrl-C (the server keeps serving)."""
    console.print(dashboard_line(server), markup=False, highlight=False)
    console.print(
        f"the server keeps serving (CA certificate {server.ca_cert}); Ctrl-C stops it "
        "and prints the summary",
        markup=False,
        highlight=False,
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        console.print("stopping the server")
