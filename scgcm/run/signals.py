"""Stopping a run on SIGTERM/SIGINT: checkpoint at the next step boundary, or exit at once."""

import os
import signal
import sys
import threading
import time


class StopSignal:
    """First SIGTERM/SIGINT: ask the loop to checkpoint and stop. Second (DUPLICATE_S or more later): exit at once.

    Signals are counted by a watcher thread reading Python's signal wakeup fd, so a second
    signal acts even while the main thread is inside a long compile or a jitted call.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    DUPLICATE_S = 1.0
    """A second signal this soon after the first is the same request delivered twice: `timeout` and
    schedulers (SLURM) signal both the process and its process group. Only a later one exits at once."""

    def __init__(self):
        self.signum: int | None = None
        self._first_at = 0.0
        self._exit_message: str | None = None
        self._on_exit = None
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous = {s: signal.signal(s, lambda *_: None) for s in self.SIGNALS}
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, daemon=True, name="scgcm-signals").start()

    def _watch(self) -> None:
        while data := os.read(self._read, 1):
            signum = data[0]
            if signum not in self.SIGNALS:
                continue
            name = signal.Signals(signum).name
            if self._exit_message is not None:
                message = f"{name} {self._exit_message}"
                sys.stderr.write(f"\n{message}\n")
                sys.stderr.flush()
                if self._on_exit is not None:
                    self._on_exit(message)
                os._exit(128 + signum)
            if self.signum is not None:
                if time.monotonic() - self._first_at < self.DUPLICATE_S:
                    continue
                sys.stderr.write(f"\nsecond signal {name}: exiting now\n")
                sys.stderr.flush()
                os._exit(128 + signum)
            self.signum, self._first_at = signum, time.monotonic()
            sys.stderr.write(f"\n{name}: saving a checkpoint, then exiting (signal again to exit now)\n")
            sys.stderr.flush()

    def exit_at_once(self, message: str, on_exit=None) -> None:
        """From now on a signal exits at once with 128 + signum, after printing '<SIGNAL> <message>'
        and passing that line to `on_exit` (for log.txt)."""
        self._on_exit = on_exit
        self._exit_message = message

    def restore(self) -> None:
        """The handlers from before; but after a stop signal, whose process is about to exit, a quiet
        'exit now' handler instead: a second signal during the exit itself (JAX's atexit handlers, orbax's
        threads) then ends it with 128 + signum and one line, not a KeyboardInterrupt traceback."""
        signal.set_wakeup_fd(self._previous_fd)
        for s, handler in self._previous.items():
            signal.signal(s, handler if self.signum is None else _exit_now)
        os.close(self._write)


def _exit_now(signum: int, _frame) -> None:
    sys.stderr.write(f"\nsecond signal {signal.Signals(signum).name}: exiting now\n")
    sys.stderr.flush()
    os._exit(128 + signum)
