"""Command-line front end: ``otaguard``."""

from otaguard.cli._cli import main, passphrase_env_var

__all__ = ["main", "passphrase_env_var"]
