"""CLI layer: the ``fednode`` command. argparse with one module per subcommand; every expected
failure becomes one line on stderr and the exit code :data:`fednode.errors.EXIT_CODES` gives it.

A subcommand is a module with ``add_parser(subparsers)`` and ``run(args) -> int``
(:class:`~fednode.cli.command.Command`), listed in :data:`COMMANDS`. Each keeps its top level to
the standard library and imports the layers it drives inside ``run``: ``fednode --help`` stays
fast, and no command pays for (or drags in) another's imports, least of all torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from fednode import __version__
from fednode.cli import demo, inspect, keygen, peers, start
from fednode.cli import id as id_command
from fednode.cli.command import Command
from fednode.cli.text import printable
from fednode.errors import EXIT_CODES, FednodeError, exit_code_for

#: Exit codes outside :data:`fednode.errors.EXIT_CODES`.
EXIT_OS_ERROR = 1  # a file we were told to read or write is missing or unreadable
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

#: The subcommands, in the order ``fednode --help`` lists them. Add new ones here.
COMMANDS: tuple[Command, ...] = (start, demo, peers, keygen, id_command, inspect)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fednode",
        description="A peer-to-peer federated-learning node.",
        epilog=exit_code_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers).set_defaults(run=command.run)
    return parser


def exit_code_help() -> str:
    """The exit-code table for ``--help``, drawn from :data:`fednode.errors.EXIT_CODES`."""
    meaning: dict[int, list[str]] = {0: ["success"], EXIT_OS_ERROR: ["a file cannot be read"]}
    meaning[2] = ["usage error"]
    for cls, code in EXIT_CODES:
        meaning.setdefault(code, []).append(cls.__name__)
    meaning[EXIT_INTERRUPTED] = ["interrupted"]
    lines = [f"  {code:<3}  {', '.join(names)}" for code, names in sorted(meaning.items())]
    return "exit codes:\n" + "\n".join(lines)


def fail(message: str, code: int) -> int:
    """Print ``fednode: error: <message>`` as one line on stderr and return ``code``."""
    print(f"fednode: error: {printable(message)}", file=sys.stderr, flush=True)
    return code


def describe_os_error(exc: OSError) -> str:
    if exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fednode`` with ``argv`` (default: the process arguments); return the exit code.

    Usage errors exit 2 through argparse (``SystemExit``). Errors fednode raises on purpose, and
    files that cannot be read, print one line; anything else is a bug and keeps its traceback.
    """
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
        sys.stdout.flush()
    except FednodeError as exc:
        return fail(str(exc) or type(exc).__name__, exit_code_for(exc))
    except BrokenPipeError:
        # The reader (``| head``) went away. Exit 1 quietly, as rich does when it hits this
        # first; stdout goes to /dev/null so Python's flush at exit does not complain.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OS_ERROR
    except OSError as exc:
        return fail(describe_os_error(exc), EXIT_OS_ERROR)
    except KeyboardInterrupt:
        print("fednode: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
