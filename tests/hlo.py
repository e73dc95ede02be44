"""Reading compiled and lowered programs in tests: collectives, loops, MACs.

``jax.jit(f).lower(...).compile().as_text()`` is the per-device HLO after SPMD
partitioning; ``jax.jit(f).trace(...).lower(lowering_platforms=('cuda',))
.as_text()`` the StableHLO of a program for a platform this machine lacks.
"""

import re

import numpy as np

COLLECTIVES = ('all-gather', 'all-to-all', 'collective-permute', 'all-reduce',
               'reduce-scatter')
_COLLECTIVE = re.compile(r'= (\([^=]*?\)|\S+) (' + '|'.join(COLLECTIVES) +
                         r')(?:-start)?\(')
_ARRAY = re.compile(r'\w+\[([\d,]*)\]')


def collectives(hlo: str) -> list[tuple[str, int]]:
  """(kind, elements moved) of every collective op of compiled HLO text (a
  combined all-reduce of several arrays counts their elements together)."""
  found = []
  for shape, kind in _COLLECTIVE.findall(hlo):
    elements = sum(int(np.prod([int(d) for d in dims.split(',') if d]))
                   for dims in _ARRAY.findall(shape))
    found.append((kind, elements))
  return found


def trip_counts(hlo: str) -> list[int]:
  """The known trip counts of the while loops of compiled HLO text."""
  # Older XLA prints known_trip_count={n=28}, newer a backend_config entry
  # "known_trip_count":{"n":"28"}.
  return [int(n) for n in re.findall(
      r'known_trip_count"?[=:]\{"?n"?[=:]"?(\d+)', hlo)]
