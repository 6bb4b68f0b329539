"""One rule for every command line: a problem the user can fix is one line on stderr and exit code 2.

Code anywhere raises `UserError("--flag VALUE: what is wrong")` (data problems raise its subclass
`scgcm.data.DataError`); each CLI's `__main__` runs its main function through `run_cli`, which turns
those into `error: …` and exit code 2. `--debug` on the command line or `SCGCM_DEBUG=1` in the
environment shows the traceback instead. A Python warning raised meanwhile (a dataset fall-back, a
biased FID) is one line too: the run's log (stderr and log.txt) in a training run, else
`warning: …` on stderr, never its source file and line.
"""

import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence


class UserError(Exception):
    """A problem with the user's input or files that they can fix; its message is one line naming the flag or file."""


def debug_requested(argv: Sequence[str], env=os.environ) -> bool:
    return "--debug" in argv or env.get("SCGCM_DEBUG", "") not in ("", "0")


def run_cli(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run `main(argv without --debug)`; a UserError becomes one `error:` line and exit code 2
    (the traceback only with --debug or SCGCM_DEBUG=1). Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = show_warning_on_one_line
        try:
            return main(argv) or 0
        except UserError as e:
            if debug:
                raise
            print(f"error: {e}", file=sys.stderr)
            return 2


def show_warning_on_one_line(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` for the CLIs: the message alone, on one line, through the "scgcm" logger
    when a run has set it up (`rundir.setup_logging`: stderr and log.txt), else as `warning: …` on stderr."""
    text = " ".join(str(message).split())
    logger = logging.getLogger("scgcm")
    if logger.handlers:
        logger.warning("%s", text)
    else:
        print(f"warning: {text}", file=sys.stderr)
