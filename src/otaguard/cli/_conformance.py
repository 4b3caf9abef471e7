"""``otaguard-conformance``: tuf-conformance's client-under-test CLI over the agent's path.

The protocol (tuf-conformance ``CLIENT-CLI.md``)::

    otaguard-conformance --metadata-dir DIR init TRUSTED_ROOT
    otaguard-conformance --metadata-dir DIR --metadata-url URL refresh
    otaguard-conformance --metadata-dir DIR --metadata-url URL --target-name PATH \\
        [--target-name PATH ...] --target-base-url URL --target-dir DIR download

Exit 0 on success, 1 on any failure with one line on stderr naming it (the protocol asks
for 1; otaguard's own CLI has an exit code per kind of error). The repository is reached
over https with ``--ca-file``, or over plain http with ``--insecure-http`` (development
only, as a device's ``insecure_http``: it warns on every run), which is what the suite
serves. Thin: the work is :mod:`otaguard.agent.conformance`.
"""

from __future__ import annotations

import argparse
import logging
import ssl
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Literal, NoReturn

from otaguard.model.errors import InsecureModeWarning, OperatorError, OtaguardError
from otaguard.model.unsafe import Unsafe

__all__ = ["main"]

#: the protocol's exit code for every failure
EXIT_FAILURE: Final = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # A usage error is a failure too: the protocol knows only 0 and 1.
        self.print_usage(sys.stderr)
        self.exit(EXIT_FAILURE, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="otaguard-conformance",
        description="tuf-conformance client CLI over the otaguard agent's TUF client",
    )
    p.add_argument("--metadata-dir", type=Path, required=True, help="trusted metadata")
    p.add_argument("--metadata-url", help="the repository's metadata base URL")
    p.add_argument(
        "--target-name", action="append", default=[], help="target path (repeatable, in order)"
    )
    p.add_argument("--target-base-url", help="the repository's targets base URL")
    p.add_argument("--target-dir", type=Path, help="where verified targets are stored")
    p.add_argument("--ca-file", type=Path, help="the CA an https repository chains to")
    p.add_argument(
        "--insecure-http",
        action="store_true",
        help="development only: reach the repository over plain http (warns)",
    )
    p.add_argument("-v", "--verbose", action="count", default=0)
    sub = p.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="provision the trusted root; no network")
    init.add_argument("trusted_root", type=Path)
    sub.add_parser("refresh", help="update the top-level metadata")
    sub.add_parser("download", help="refresh, then download and verify the targets")
    return p


def _tls(a: argparse.Namespace) -> ssl.SSLContext | Literal[Unsafe.PLAIN_HTTP]:
    if a.insecure_http:
        if a.ca_file is not None:
            raise OperatorError("--insecure-http and --ca-file exclude each other")
        return Unsafe.PLAIN_HTTP
    if a.ca_file is None:
        raise OperatorError("an https repository needs --ca-file (plain http: --insecure-http)")
    from otaguard.agent.fetcher import create_ssl_context

    try:
        return create_ssl_context(ca_file=a.ca_file)
    except (OSError, ssl.SSLError) as e:
        raise OperatorError(f"cannot use CA file {a.ca_file}: {e}") from e


def _required(a: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if not getattr(a, n)]
    if missing:
        raise OperatorError(f"{a.command} needs {', '.join(missing)}")


def _run(a: argparse.Namespace) -> None:
    from otaguard.agent import conformance
    from otaguard.agent.updater import RepositoryUrls

    if a.command == "init":
        conformance.init(metadata_dir=a.metadata_dir, trusted_root=a.trusted_root)
        return
    if a.command == "refresh":
        _required(a, "metadata_url")
        # ngclient needs a targets URL; refresh never fetches a target.
        urls = RepositoryUrls(metadata=a.metadata_url, targets=a.metadata_url)
        session = conformance.open_session(metadata_dir=a.metadata_dir, urls=urls, tls=_tls(a))
        conformance.refresh(session)
        return
    _required(a, "metadata_url", "target_name", "target_base_url", "target_dir")
    urls = RepositoryUrls(metadata=a.metadata_url, targets=a.target_base_url)
    session = conformance.open_session(metadata_dir=a.metadata_dir, urls=urls, tls=_tls(a))
    for path in conformance.download(session, a.target_name, target_dir=a.target_dir):
        print(path)


def _show_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command of the protocol; returns the exit code (0, or 1 on any failure)."""
    args = _parser().parse_args(argv)
    levels = (logging.WARNING, logging.INFO, logging.DEBUG)
    level = levels[min(args.verbose, len(levels) - 1)]
    # The whole process is this client: python-tuf's own debug lines are worth seeing.
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    warnings.simplefilter("always", InsecureModeWarning)
    warnings.showwarning = _show_warning
    try:
        _run(args)
    except OtaguardError as e:
        print(f"otaguard-conformance {args.command}: {e.diagnostics()}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as e:  # the metadata or target directory itself
        print(f"otaguard-conformance {args.command}: {e.strerror}: {e.filename}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as e:  # the process boundary: one line, never a traceback
        logging.getLogger("otaguard").debug("unexpected error", exc_info=True)
        print(
            f"otaguard-conformance {args.command}: internal error: {type(e).__name__}: "
            f"{' '.join(str(e).split())[:300]}",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return 0
