"""`michi data ...` subcommands."""
from __future__ import annotations

import argparse


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    """Register `michi data ...` on the top-level subparsers."""
