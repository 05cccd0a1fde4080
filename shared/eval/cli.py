"""`michi eval ...` subcommands."""
from __future__ import annotations

import argparse


def add_eval_commands(sub: argparse._SubParsersAction) -> None:
    """Register `michi eval ...` on the top-level subparsers."""
