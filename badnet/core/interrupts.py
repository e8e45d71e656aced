"""Ctrl-C that is not lost on its way to the job's one-line exit.

Python runs a signal handler wherever the main thread happens to be, and an
exception raised while that is a finaliser (``__del__``, a weakref callback)
is printed and dropped: the job runs on as if Ctrl-C had not been pressed.
``install`` keeps the request, and ``check`` (called at the top of each step
of the long loops) raises it again there, where no file is half-written.
"""

import signal

_requested = False


def _on_interrupt(signum: int, frame: object) -> None:
  del signum, frame
  global _requested
  _requested = True
  raise KeyboardInterrupt


def install() -> None:
  """Keeps Ctrl-C once pressed; a process started with SIGINT ignored keeps ignoring it."""
  if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _on_interrupt)


def check() -> None:
  """Raises KeyboardInterrupt when Ctrl-C was pressed (even if its first raise was dropped)."""
  if _requested:
    raise KeyboardInterrupt
