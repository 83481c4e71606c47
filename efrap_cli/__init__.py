"""The `efrap` command line: thin subcommands over efrap_plugin and its adapters."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
