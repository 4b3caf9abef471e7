"""The update server: ASGI app, storage adapters, repository sync, online roles, publish client.

Prepare its data directory with :func:`init_data_dir` (the online public key for
``repo init --online-key``), start it with :func:`run_server` (foreground, HTTPS) or
:func:`start_server_in_thread` (demo and tests). Release tooling publishes with
:func:`publish_repository`; operators manage the inventory, groups, operator tokens and
the audit log with :class:`OpsClient`; server code asks :class:`Inventory` who is in a
group.
"""

from otaguard.server.app import create_app
from otaguard.server.auth import Role, load_or_create_operator_token
from otaguard.server.client import PublishResult, publish_repository
from otaguard.server.inventory import Inventory
from otaguard.server.ops_client import OpsClient
from otaguard.server.publish import publish_files
from otaguard.server.runner import (
    DataDirPaths,
    RunningServer,
    init_data_dir,
    run_server,
    start_server_in_thread,
)
from otaguard.server.settings import ServerSettings

__all__ = [
    "DataDirPaths",
    "Inventory",
    "OpsClient",
    "PublishResult",
    "Role",
    "RunningServer",
    "ServerSettings",
    "create_app",
    "init_data_dir",
    "load_or_create_operator_token",
    "publish_files",
    "publish_repository",
    "run_server",
    "start_server_in_thread",
]
