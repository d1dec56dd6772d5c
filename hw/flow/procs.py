"""Tools the flows start, and how a flow ends them: nothing a command starts outlives it.

* :func:`stop` ends a tool process (``SIGTERM``, then ``SIGKILL`` if it does not go)
  and reaps it; with ``group`` the whole process group of a tool started with
  ``start_new_session=True`` (SymbiYosys and the solvers it starts).
* :func:`end_on_signals` turns ``SIGTERM`` and ``SIGHUP`` into :class:`Terminated`
  inside a block, so that the ``finally`` clauses that stop the tools run on the way
  out, as they do for ``Ctrl-C`` (``KeyboardInterrupt``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager

__all__ = ["Terminated", "end_on_signals", "stop", "group_members", "GRACE_SECONDS"]

# How long a tool has to end after SIGTERM before it is killed.
GRACE_SECONDS = 10


class Terminated(BaseException):
    """The process was asked to end (SIGTERM, SIGHUP): raised where it runs, so that
    every ``finally`` on the way out runs too (the tools a command started are stopped,
    its files closed). A ``BaseException``, so that no ``except Exception`` holds it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextmanager
def end_on_signals(signums=(signal.SIGTERM, signal.SIGHUP)):
    """Turn the signals in ``signums`` into :class:`Terminated` while the block runs.
    A signal that the process ignores (``nohup`` ignores SIGHUP) stays ignored."""

    def handler(signum, frame):
        raise Terminated(signum)

    saved = {}
    try:
        for s in signums:
            # (Handlers belong to the main thread: elsewhere the signals keep theirs.)
            if threading.current_thread() is threading.main_thread() and \
                    signal.getsignal(s) == signal.SIG_DFL:
                saved[s] = signal.signal(s, handler)
        yield
    finally:
        for s, old in saved.items():
            signal.signal(s, old)


def _signal(proc: subprocess.Popen, signum: int, group: bool) -> None:
    try:
        if group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
    except ProcessLookupError:
        pass


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``, from ``/proc`` (an
    empty list where there is no ``/proc``)."""
    members = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return members
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after it
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(name))
    return members


def stop(proc: subprocess.Popen, *, group: bool = False) -> None:
    """End ``proc`` if it still runs and reap it: ``SIGTERM``, then ``SIGKILL`` after
    :data:`GRACE_SECONDS`. With ``group``, every process of its process group (it was
    started with ``start_new_session=True``) gets the signals, even once ``proc`` itself
    has ended (the solvers it started may still run), and the call returns once none of
    them is left (at most :data:`GRACE_SECONDS` more)."""
    if proc.poll() is None or group:
        _signal(proc, signal.SIGTERM, group)
        try:
            proc.wait(timeout=GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        # The group's other members may ignore SIGTERM or still be going down.
        _signal(proc, signal.SIGKILL, group)
        proc.wait()
        deadline = time.monotonic() + GRACE_SECONDS
        while group and group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
