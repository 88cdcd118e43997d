"""One-line errors for every quadnet command: bad input never shows a traceback."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any, NoReturn

EXIT_BAD_INPUT = 2
STOPPED = "interrupted: stopped at once"  # how report, predict, crosscheck and bench end on a signal
KEPT = f"{STOPPED} (what was written so far is kept)"  # how quadnet.train ends on one outside its loop


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print ``error: message`` on one line to stderr and exit with ``code``."""
    print("error:", " ".join(str(message).split()), file=sys.stderr)
    sys.exit(code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with quadnet's one-line errors (exit 2) instead of a usage block."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        fail(f"{message} (see {self.prog} --help)")


@contextlib.contextmanager
def closed_pipe_ok() -> Iterator[None]:
    """Let ``python -m quadnet.report | head`` end quietly when the reader stops reading."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        # Point stdout at devnull, so that Python's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


@contextlib.contextmanager
def command() -> Iterator[None]:
    """Around the work of report, predict, crosscheck and bench: Ctrl-C or SIGTERM ends it in one
    line (exit 130/143), and a reader that stops reading ends it quietly (the handlers are put back after)."""
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    on_signals(STOPPED)
    try:
        with closed_pipe_ok():
            yield
    except KeyboardInterrupt as e:  # (quadnet.train.Interrupted: a run of bench's, stopped as it was written)
        fail(STOPPED, 128 + getattr(e, "signum", signal.SIGINT))
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def on_signals(message: str, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
    """From now on these signals end the command with ``error: message`` and exit 128+signal, wherever
    it is (while torch imports, say), instead of a traceback or a silent death. The training loop
    sets its own handlers while it trains (:func:`quadnet.loop.catch_signals`)."""

    def handler(signum: int, frame: Any) -> None:
        # the SystemExit unwinds (files are written atomically, subprocesses are ended); should code it
        # lands in swallow it (a broad except in an import), the process ends 2 s later all the same
        backstop = threading.Timer(2.0, os._exit, (128 + signum,))
        backstop.daemon = True
        backstop.start()
        fail(message, 128 + signum)

    for s in signals:
        signal.signal(s, handler)


def _start(name: str, message: str = STOPPED) -> None:
    """A console command runs as ``python -m quadnet.<name>`` does: a signal while it imports ends in one line too."""
    on_signals(message)
    importlib.import_module(f"quadnet.{name}").main()


def train_main() -> None:
    _start("train", "interrupted while starting: nothing was written")


def predict_main() -> None:
    _start("predict")


def report_main() -> None:
    _start("report")


def crosscheck_main() -> None:
    _start("crosscheck")


@contextlib.contextmanager
def friendly_errors() -> Iterator[None]:
    """Turn bad input (config, override, checkpoint, a path in the way) into ``error: …`` and exit code 2.

    Hydra prints composition errors over several lines; with HYDRA_FULL_ERROR set it
    raises them instead, and they are caught and shortened here. A path that cannot be read
    or written is not a bug in quadnet either; anything else is, and keeps its traceback.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from quadnet.checkpoint import CheckpointError
    from quadnet.config import ConfigError, one_line, out_of_memory

    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        yield
    except (ConfigError, CheckpointError) as ex:
        fail(str(ex))
    except (HydraException, OmegaConfBaseException, ValueError) as ex:  # Hydra's composition raises ValueError too
        fail(one_line(ex))  # (before OSError: Hydra's MissingConfigException is one)
    except OSError as ex:  # a path that cannot be read or written (a full disk)
        fail(str(ex))
    except (MemoryError, RuntimeError) as ex:
        if not out_of_memory(ex):
            raise
        fail(one_line(ex))
    except KeyboardInterrupt:  # Ctrl-C before training, or twice: stop at once, keep what is written
        fail(KEPT, 130)
