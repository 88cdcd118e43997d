"""How a quadnet command ends: one ``error:`` line and an exit code for bad input, and the one
signal mechanism of every command.

Signals (SIGINT, SIGTERM and SIGHUP: a closed terminal is a stop too) go through :data:`STOP`.
While training listens (:func:`listening`), a signal is recorded and the loop ends every job at
its next step, so that what was trained is written; anywhere else it raises :class:`Stopped` at
once, which :func:`command` turns into one line and exit 128+signal. Files are written
atomically, so unwinding from any point loses nothing already written.
"""

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any, NoReturn

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOPPED = "interrupted: stopped at once"
KEPT = f"{STOPPED} (what was written so far is kept)"


class Stopped(KeyboardInterrupt):
    """A signal outside training (or a second Ctrl-C inside it): the command stops where it is."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message or signal.Signals(signum).name)
        self.signum, self.message = signum, message  # message: how the command ends ("": as it says)


class Stop:
    """Whether a signal came while training listened; a loop asks ``stop()`` between steps."""

    signal: int | None = None
    depth = 0  # nested listeners (a sweep around its jobs' loops)
    commands = 0  # commands running (inside :func:`command`)

    def __call__(self) -> bool:
        return self.signal is not None


STOP = Stop()


def _handler(signum: int, frame: Any) -> None:
    if STOP.depth and (STOP.signal is None or signum != signal.SIGINT):
        STOP.signal = STOP.signal or signum
        return
    if not STOP.commands:  # a command still importing (python -m): nothing to unwind, and an exception raised
        print(f"error: {STOPPED}", file=sys.stderr, flush=True)  # inside a library's import may be swallowed by it
        os._exit(128 + signum)  # (pyarrow's, as it imports pandas)
    raise Stopped(signum)  # outside training, or Ctrl-C twice: at once


@contextlib.contextmanager
def _handled() -> Iterator[None]:
    """The three signals through :func:`_handler` while inside, and as they were after (the main thread
    only: Python's rule; a notebook's Ctrl-C is its own again once a run is done)."""
    with contextlib.ExitStack() as restore:
        for s in SIGNALS if threading.current_thread() is threading.main_thread() else ():
            restore.callback(signal.signal, s, signal.signal(s, _handler))
        yield


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """The three signals held back while inside, and delivered after: for code that a raise would
    leave half-done (argparse's intermixed parse fails in its own clean-up)."""
    with contextlib.ExitStack() as unblock:
        unblock.callback(signal.pthread_sigmask, signal.SIG_SETMASK, signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS))
        yield


def install() -> None:
    """From now on, for the life of the process (``python -m quadnet.<command>`` as it starts)."""
    for s in SIGNALS:
        signal.signal(s, _handler)


@contextlib.contextmanager
def listening() -> Iterator[Stop]:
    """While inside, a signal is recorded in the returned :class:`Stop` instead of raised."""
    STOP.signal = STOP.signal if STOP.depth else None  # (nested: the outer listener's signal stands)
    with _handled():  # (nested: the handler it sets is the one there already)
        STOP.depth += 1
        try:
            yield STOP
        finally:
            STOP.depth -= 1


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on one line to stderr and exit with ``code`` (2: bad input)."""
    print("error:", " ".join(str(message).split()), file=sys.stderr)
    sys.exit(code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) instead of a usage block."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        fail(f"{message} (see {self.prog} --help)")


def unwritable(e: OSError, where: object) -> OSError:
    """A write's error in one line that names what could not be written (a full disk's names nothing)."""
    # (the errno's words: pyarrow's strerror names the temporary file that atomic_write gave it)
    return OSError(f"cannot write {where}: {os.strerror(e.errno) if e.errno else e.strerror or e}")


def one_line(ex: BaseException) -> str:
    """An error's first line, or its type's name."""
    return (str(ex).strip() or type(ex).__name__).splitlines()[0]


def out_of_memory(ex: BaseException) -> bool:
    """A CPU or GPU allocation that failed (torch raises RuntimeError or OutOfMemoryError)."""
    return isinstance(ex, MemoryError) or type(ex).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(ex)


OOM = "out of memory: the nets or the data do not fit (hidden_dim, data.n_train; a sweep's max_batch)"


@contextlib.contextmanager
def command(stopped: str = STOPPED, explain: Any = one_line, bad: tuple[type, ...] = ()) -> Iterator[None]:
    """Around a whole command: signals as above; bad input (a ValueError of quadnet's, a path that
    cannot be read or written, memory that is not there) as one line and exit 2; a signal as
    ``error: stopped`` and exit 128+signal; a reader that stops reading (``| head``) quietly.
    Anything else is a bug in quadnet, and keeps its traceback."""
    STOP.commands += 1
    try:
        with _handled():
            yield
        sys.stdout.flush()
    except Stopped as e:
        fail(e.message or stopped, 128 + e.signum)
    except BrokenPipeError:  # stdout's reader is gone: point it at devnull, so that Python's last flush is quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except (ValueError, OSError, *bad) as e:
        fail(explain(e))
    except (MemoryError, RuntimeError) as e:
        if isinstance(e.__cause__, Stopped):  # raised where Python wraps it (a class made as torch imports)
            fail(e.__cause__.message or stopped, 128 + e.__cause__.signum)
        if not out_of_memory(e):
            raise
        fail(OOM)
    finally:
        STOP.commands -= 1
