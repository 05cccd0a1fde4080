"""`michi train ...` subcommands."""
from __future__ import annotations

import argparse


def add_train_commands(sub: argparse._SubParsersAction) -> None:
    """Register `michi train ...` on the top-level subparsers."""
