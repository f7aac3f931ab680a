"""`ldznet`: text-prompted masks for Stable Diffusion (LD-ZNet), from the command line.

One module of this package per command group. A command module exposes ``register(subparsers)``,
which adds its parser and sets ``func(args) -> int`` as the parser default; options several
commands take are defined once in ``common.py``. The library modules the commands drive import
nothing from here, and this package is imported only when the CLI starts, so ``import ldznet_ext``
stays light. Errors are one line, ``ldznet COMMAND: error: ...``, never a traceback. Exit status:
0 done, 1 a system error (OSError, out of memory), 2 bad input (LdznetError, and the usage errors
argparse reports), 130 interrupted (Ctrl-C: one line, "ldznet COMMAND: interrupted"; outputs are
written atomically, so none is left half-written; the folders a failed command created for its outputs are
removed again when they are empty). A command may return its own status too
(``ldznet batch``: 1 when some files failed). Warnings are one line too, ``ldznet COMMAND: warning: ...``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NoReturn

from .. import __version__
from ..errors import LdznetError

COMMAND_MODULES: tuple[str, ...] = (
    "ldznet_ext.cli.checkpoint",
    "ldznet_ext.cli.demo",
    "ldznet_ext.cli.mask",
    "ldznet_ext.cli.batch",
    "ldznet_ext.cli.world",
    "ldznet_ext.cli.webui",
    "ldznet_ext.cli.train",
    "ldznet_ext.cli.eval",
    "ldznet_ext.cli.data",
)


def _given_once(action_class: type[argparse.Action]) -> type[argparse.Action]:
    """``action_class`` refusing a second, different value for its destination in one command line:
    argparse keeps the last one without a word (``-o a.png -o b.png`` wrote b.png alone)."""

    class GivenOnce(action_class):
        def __call__(self, parser, namespace, values, option_string=None):
            value = self.const if self.nargs == 0 else values
            given = parser.given_values
            if self.dest in given and given[self.dest] != value:
                raise argparse.ArgumentError(
                    self, f"given twice ('{given[self.dest]}', then '{value}'); give it once")
            given[self.dest] = value
            super().__call__(parser, namespace, values, option_string)

    GivenOnce.__name__ = f"GivenOnce{action_class.__name__}"
    return GivenOnce


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser, its usage errors one line as every other error of the CLI: the usage block it
    prints first is what --help gives (sub-command parsers are of the same class). An option that takes
    one value is refused when a command line gives it twice with different values."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.given_values: dict[str, object] = {}
        for name, action_class in (("store", argparse._StoreAction), ("store_const", argparse._StoreConstAction),
                                   ("store_true", argparse._StoreTrueAction),
                                   ("store_false", argparse._StoreFalseAction)):
            self.register("action", name, _given_once(action_class))
        self.register("action", None, self._registry_get("action", "store"))

    def parse_known_args(self, args=None, namespace=None):
        self.given_values = {}
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        hint = f" (see {self.prog} --help)" if message.startswith("the following arguments are required") else ""
        self.exit(2, f"{self.prog}: error: {one_line(message)}{hint}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="ldznet", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ldznet {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    state_ranges(parser)
    return parser


def state_ranges(parser: argparse.ArgumentParser) -> None:
    """Every bounded number's help gives its range (``bounded_number``'s Limit), in every sub-command:
    added where the text a command wrote does not give it already."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                state_ranges(sub)
            continue
        limit = getattr(action.type, "limit", None)
        if limit is not None and action.help is not argparse.SUPPRESS and not limit.stated_in(action.help or ""):
            action.help = f"{action.help}; {limit.span()}" if action.help else limit.span()


def one_line(message: object) -> str:
    """``message`` as one line of output: line breaks it carries (a file name may hold one) shown as
    ``\\n`` and ``\\r``."""
    return str(message).replace("\r", "\\r").replace("\n", "\\n")


def _end_at_once(signum: int, frame: object) -> None:
    """Ctrl-C before a command runs: nothing is written yet, so end here. A KeyboardInterrupt raised in
    the middle of importing torch can be swallowed, or turn into another error, or a traceback."""
    sys.stderr.write("ldznet: interrupted\n")
    sys.stderr.flush()
    os._exit(130)


def _interrupt_command(signum: int, frame: object) -> None:
    """Ctrl-C while a command runs: KeyboardInterrupt, as Python's own handler raises it, and a note that
    it came: code that catches broadly (safetensors reading a file) can turn it into another error,
    which is then reported as the interruption it was, not as a corrupt file."""
    _interrupt_command.seen = True
    raise KeyboardInterrupt


def _on_interrupt(handler: object) -> object:
    """Install ``handler`` for SIGINT and return the one it replaces (None, and nothing changed, off the
    main thread, where Python allows no signal handler)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, handler)


class _CommandWarnings(logging.Handler):
    """The library's log warnings (a skipped example, a CUDA-graph fallback) as the command's own one-line
    warnings; a host that imports the library routes its logger as it likes."""

    def __init__(self, command: str):
        super().__init__(logging.WARNING)
        self.command = command

    def emit(self, record: logging.LogRecord) -> None:
        print(f"ldznet {self.command}: warning: {one_line(record.getMessage())}", file=sys.stderr)


@contextmanager
def _log_warnings(command: str) -> Iterator[None]:
    logger, handler = logging.getLogger("ldznet_ext"), _CommandWarnings(command)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    previous = _on_interrupt(_end_at_once)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        # imported under the handler, as the commands' modules are (it imports numpy, PIL and cv2)
        from ..outputs import folders_removed_on_failure
    finally:
        if previous is not None:
            _on_interrupt(previous)
    # "world sample", "data summary": a group's messages name the sub-command too
    command = " ".join(filter(None, (args.command, getattr(args, f"{args.command}_command", None))))
    _interrupt_command.seen = False
    previous = _on_interrupt(_interrupt_command)
    try:
        with warnings.catch_warnings(), _log_warnings(command):  # both restore the caller's display at the end
            warnings.showwarning = lambda message, *_, **__: print(
                f"ldznet {command}: warning: {one_line(message)}", file=sys.stderr)
            with folders_removed_on_failure():  # a failed command leaves no empty output folder behind
                return int(args.func(args) or 0)
    except (LdznetError, OSError, MemoryError) as error:
        if _interrupt_command.seen:
            print(f"ldznet {command}: interrupted", file=sys.stderr)
            return 130
        if isinstance(error, LdznetError):
            print(f"ldznet {command}: error: {one_line(error)}", file=sys.stderr)
            return 2
        # what no command anticipated (an unwritable -o folder, a full disk): no traceback
        print(f"ldznet {command}: error: {'out of memory' if isinstance(error, MemoryError) else one_line(error)}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ldznet {command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            _on_interrupt(previous)
