"""How a training session starts and stops, apart from the training itself.

* :func:`run_lock`: a run folder is trained by one process at a time. ``<run>/.lock`` is created
  with ``O_EXCL`` and holds the owner's pid; a second run (or resume) of the folder while the
  owner lives is refused; a lock left by a dead process (killed, machine rebooted) is taken over.
* :func:`stop_signals`: the first SIGINT (Ctrl-C) or SIGTERM asks the loop to stop after the
  current step (the trainer then checkpoints it); a second one acts at once.
* :func:`say`: progress and warning lines go to the ``composer.run`` logger (``train.log`` of a
  ``hycomp train`` run folder, through Hydra's job logging); warnings also go to stderr.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from composer.core.errors import HycompError

log = logging.getLogger("composer.run")
log.addHandler(logging.NullHandler())  # no handler configured: say nothing (no lastResort)

LOCK = ".lock"


def say(msg: str, warn: bool = False) -> None:
    """Log ``msg``; a warning is printed to stderr too."""
    if warn:
        print(msg, file=sys.stderr)
        log.warning(msg)
    else:
        log.info(msg)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # left by an earlier session of this process (it has ended)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Create ``run_dir`` if needed and hold ``run_dir/.lock`` while the block runs; raise
    :class:`HycompError` when a live process holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                raise HycompError(what="another run is training in this folder",
                                  where=str(run_dir), why=f"process {pid} holds {lock}",
                                  fix="wait for it to end, or train into another folder (leave "
                                      "hydra.run.dir at its default: every run gets its own)"
                                  ) from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        break
    else:
        raise HycompError(what="cannot take the run folder's lock", where=str(lock),
                          why="it keeps reappearing", fix="train into another folder")
    try:
        yield run_dir
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()


@contextlib.contextmanager
def stop_signals(state):
    """While active, the first SIGINT or SIGTERM sets ``state.interrupted`` (and
    ``state.stop_signal``) instead of stopping the process; the handlers then step aside, so a
    second one acts at once (SIGINT: ``KeyboardInterrupt``; SIGTERM: the previous handler)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
    previous = {}
    for s in sigs:
        previous[s] = signal.getsignal(s)
        if previous[s] is None:
            previous[s] = signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL

    def handler(signum, frame):
        state.interrupted = True
        state.stop_signal = signal.Signals(signum).name
        for s in sigs:
            signal.signal(s, previous[s])
        print(f"\n{state.stop_signal}: finishing this step, then writing a checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr)

    for s in sigs:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s in sigs:
            signal.signal(s, previous[s])
