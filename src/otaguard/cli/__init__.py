"""Command-line front end: ``otaguard``."""

from otaguard.cli._cli import main

__all__ = ["main"]
