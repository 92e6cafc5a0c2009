"""CLI layer: what a subcommand module provides. Standard library only, so importing the
registry in ``main`` costs nothing."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


class Command(Protocol):
    """A subcommand: a module with these two functions.

    ``add_parser`` adds the subcommand's parser and returns it. ``run`` does the command and
    returns the exit code; it fails by raising ``FednodeError`` (or ``OSError`` for a file it was
    given), which ``main`` prints as one line. Keep the module's top level to the standard
    library and import the layers it drives inside ``run``.
    """

    def add_parser(self, subparsers: Subparsers) -> argparse.ArgumentParser: ...

    def run(self, args: argparse.Namespace) -> int: ...
