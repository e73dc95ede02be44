"""Running the package's commands: expected failures become one clear line.

The exception types that signal bad input or a failing environment (a wrong
flag, a missing file, a mismatched checkpoint, a full disk:
``glmix_jax.errors.USER_ERRORS`` unless a command passes others) end the
program with one line, ``error: <message>``, on stderr and exit status 1,
without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging as py_logging
import sys
import traceback
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging

from glmix_jax import errors as user_errors


def _one_line(message: object) -> str:
  return ' '.join(str(message).split())


# A checkpoint write that fails (a full disk) reaches ``run`` as one
# exception, reported there in one line. Orbax's writer threads also log it
# several times with tracebacks, asyncio logs the same error of each of their
# tasks, and the writes still in flight when Orbax gives up fail once more
# (in tensorstore callbacks on Orbax's closed event loop, or as coroutines
# closed at exit): those echoes are dropped.


class _WithoutOrbaxEchoes(py_logging.Filter):

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno < py_logging.ERROR:
      return True
    if '/orbax/' in record.pathname:
      return False
    if record.name != 'asyncio':  # "Task exception was never retrieved"
      return True
    trace = traceback.extract_tb(record.exc_info[2]) if record.exc_info else []
    return not ('orbax' in record.getMessage() or
                any('/orbax/' in frame.filename for frame in trace))


def _without_closed_loop_echoes(default_hook):

  def hook(unraisable):
    value = unraisable.exc_value
    code = getattr(unraisable.object, 'cr_code', None)  # a coroutine's
    closed_loop = (isinstance(value, RuntimeError) and
                   str(value) == 'Event loop is closed')
    if not (closed_loop or '/orbax/' in getattr(code, 'co_filename', '')):
      default_hook(unraisable)

  return hook


def _flag_error(error: BaseException) -> str:
  """A flag's error on one line. A config file's ``get_config`` that raises
  (``--config=configs/glnet.py:variant=5g``) reaches here as the flag's
  message with the whole traceback in it; its last line is the reason."""
  text = str(error)
  head, traceback_found, trace = text.partition(
      'Error whilst parsing config file:')
  if traceback_found and 'Traceback' in trace:
    last = [line for line in trace.splitlines() if line.strip()][-1]
    text = f'{head.rstrip()} {last.partition(": ")[2] or last}'
  return _one_line(text)


def run(main: Callable[[Sequence[str]], None],
        errors: tuple[type[BaseException], ...] = user_errors.USER_ERRORS
        ) -> None:
  """``absl.app.run(main)``, reporting ``errors`` as one line and exit 1.

  Flags are parsed first under the same rule: ml_collections raises plain
  KeyError / AttributeError / TypeError for a config field that does not exist
  or has the wrong type.
  """
  try:
    args = flags.FLAGS(sys.argv)
  except (KeyError, AttributeError) as e:
    message = e  # ml_collections wraps a KeyError, whose str() is a repr
    while isinstance(message, BaseException) and message.args:
      message = message.args[0]
    print(f'error: no such config field: {_one_line(message)}',
          file=sys.stderr)
    sys.exit(1)
  except (flags.Error, TypeError, ValueError) as e:
    print(f'error: bad command line: {_flag_error(e)}', file=sys.stderr)
    sys.exit(1)

  def guarded(argv):
    # Library INFO logs (Orbax, TFDS) would drown the progress lines.
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_handler().addFilter(_WithoutOrbaxEchoes())
    sys.unraisablehook = _without_closed_loop_echoes(sys.unraisablehook)
    try:
      main(argv)
    except errors as e:  # bad input: say what and how to fix it, no trace
      print(f'error: {_one_line(e)}', file=sys.stderr)
      sys.exit(1)

  app.run(guarded, flags_parser=lambda argv: args)  # parsed once, above
