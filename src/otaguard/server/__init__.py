"""The update server: ASGI app, storage adapters, repository sync, and the publish client.

Start it with :func:`run_server` (foreground, HTTPS) or :func:`start_server_in_thread`
(demo and tests). Release tooling publishes with :func:`publish_repository`.
"""

from otaguard.server.app import create_app
from otaguard.server.auth import load_or_create_operator_token
from otaguard.server.client import PublishResult, publish_repository
from otaguard.server.publish import publish_files
from otaguard.server.runner import RunningServer, run_server, start_server_in_thread
from otaguard.server.settings import ServerSettings

__all__ = [
    "PublishResult",
    "RunningServer",
    "ServerSettings",
    "create_app",
    "load_or_create_operator_token",
    "publish_files",
    "publish_repository",
    "run_server",
    "start_server_in_thread",
]
