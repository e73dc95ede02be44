"""Running the package's commands: expected failures become one clear line.

A command passes the exception types that signal bad input (a wrong flag, a
missing file, a mismatched checkpoint); those end the program with
``error: <message>`` on stderr and exit status 1, without a traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging


def run(main: Callable[[Sequence[str]], None],
        errors: tuple[type[BaseException], ...] = (ValueError,)) -> None:
  """``absl.app.run(main)``, reporting ``errors`` as one line and exit 1.

  Flags are parsed first under the same rule: ml_collections raises plain
  KeyError / AttributeError / TypeError for a config field that does not exist
  or has the wrong type.
  """
  try:
    args = flags.FLAGS(sys.argv)
  except (KeyError, AttributeError) as e:
    print(f'error: no such config field: {e}', file=sys.stderr)
    sys.exit(1)
  except (flags.Error, TypeError, ValueError) as e:
    print(f'error: bad command line: {e}', file=sys.stderr)
    sys.exit(1)

  def guarded(argv):
    # Library INFO logs (Orbax, TFDS) would drown the progress lines.
    logging.set_verbosity(logging.WARNING)
    try:
      main(argv)
    except errors as e:  # bad input: say what and how to fix it, no trace
      print(f'error: {e}', file=sys.stderr)
      sys.exit(1)

  app.run(guarded, flags_parser=lambda argv: args)  # parsed once, above
