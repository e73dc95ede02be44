"""Reading compiled and lowered programs in tests: collectives, loops, MACs.

``jax.jit(f).lower(...).compile().as_text()`` is the per-device HLO after SPMD
partitioning; ``jax.jit(f).trace(...).lower(lowering_platforms=('cuda',))
.as_text()`` the StableHLO of a program for a platform this machine lacks.
"""

import pathlib
import re

import numpy as np

COLLECTIVES = ('all-gather', 'all-to-all', 'collective-permute', 'all-reduce',
               'reduce-scatter')
# One instruction per line: "%name = SHAPE op(operands), attributes", where
# SHAPE is an array type or a tuple of them (with /*index=5*/ comments).
_COLLECTIVE = re.compile(r'^\s*(?:ROOT )?%?\S+ = (.+?) (' + '|'.join(COLLECTIVES)
                         + r')(?:-start)?\(')
_ARRAY = re.compile(r'\w+\[([\d,]*)\]')


def elements(shape: str) -> int:
  """Elements of an HLO shape, summed over the arrays of a tuple."""
  return sum(int(np.prod([int(d) for d in dims.split(',') if d]))
             for dims in _ARRAY.findall(shape))


def collectives(hlo: str) -> list[tuple[str, int]]:
  """(kind, elements moved) of every collective op of compiled HLO text (a
  combined all-reduce of several arrays counts their elements together)."""
  found = []
  for line in hlo.splitlines():
    match = _COLLECTIVE.match(line)
    if match:
      found.append((match.group(2), elements(match.group(1))))
  return found


def trip_counts(hlo: str) -> list[int]:
  """The known trip counts of the while loops of compiled HLO text."""
  # Older XLA prints known_trip_count={n=28}, newer a backend_config entry
  # "known_trip_count":{"n":"28"}.
  return [int(n) for n in re.findall(
      r'known_trip_count"?[=:]\{"?n"?[=:]"?(\d+)', hlo)]


# An instruction of HLO text: name, shape, opcode, operands, attributes.
_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT )?%?(\S+) = (.+?) ([a-z][\w-]*)\(([^)]*)\)(.*)$')


def macs(hlo: str, *, elementwise_scope: str, uncounted_scope: str
         ) -> dict[str, int]:
  """Multiply-accumulates of the dots, convolutions and in-scope element-wise
  products of HLO text with metadata (``lowered.as_text(dialect='hlo',
  debug_info=True)``, before XLA's passes: no fusions), by kind, as
  ``summary.count_macs`` counts the jaxpr, and (``'of the images'``) those
  of the convolutions that read 3-channel images. An op inside a while loop
  counts once."""
  shapes, totals = {}, dict(dot=0, convolution=0, elementwise=0)
  image_convolutions = 0
  for line in hlo.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, shape, op, operands, attributes = match.groups()
    shapes[name] = shape
    if uncounted_scope in attributes:
      continue
    out = elements(shape)
    if op == 'dot':
      lhs = _dims(shapes[operands.split(',')[0].strip().lstrip('%')])
      contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}',
                              attributes).group(1)
      totals['dot'] += out * int(np.prod(
          [lhs[int(d)] for d in contracting.split(',') if d]))
    elif op == 'convolution':
      lhs, rhs = (_dims(shapes[o.strip().lstrip('%')])
                  for o in operands.split(',')[:2])
      conv = _conv_macs(_dims(shape), rhs, attributes)
      totals['convolution'] += conv
      lhs_labels = re.search(r'dim_labels=(\w+)_', attributes).group(1)
      if lhs[lhs_labels.index('f')] == 3:
        image_convolutions += conv
    elif op == 'multiply' and elementwise_scope in attributes:
      totals['elementwise'] += out
  totals['total'] = sum(totals.values())
  # The convolutions of the RGB images: a train step needs no gradient
  # with respect to its input images.
  totals['of the images'] = image_convolutions
  return totals


def _conv_macs(out: list[int], rhs: list[int], attributes: str) -> int:
  """Products of a convolution: for every output element, its input
  features (C_in / groups) times the window taps that land on the input or
  its padding, as ``summary`` counts a forward conv; taps on the holes of a
  dilated input (the input gradient of a strided conv) multiply zeros
  inserted by the lowering and are not counted."""
  rhs_labels, out_labels = re.search(r'dim_labels=\w+_(\w+)->(\w+)',
                                     attributes).groups()
  spatial = [c for c in rhs_labels if c.isdigit()]
  window = dict(re.findall(r'(\w+)=([\dx_-]+)',
                           re.search(r'window=\{([^}]*)\}', attributes).group(1)))
  per_dim = lambda key, default: (
      [int(v) for v in window[key].split('x')] if key in window
      else [default] * len(spatial))
  strides, lhs_dilation = per_dim('stride', 1), per_dim('lhs_dilate', 1)
  rhs_dilation = per_dim('rhs_dilate', 1)
  pads = ([int(p.split('_')[0]) for p in window['pad'].split('x')]
          if 'pad' in window else [0] * len(spatial))
  taps = 1
  for i, label in enumerate(spatial):
    size, positions = rhs[rhs_labels.index(label)], out[out_labels.index(label)]
    o, t = np.meshgrid(np.arange(positions), np.arange(size), indexing='ij')
    where = o * strides[i] + t * rhs_dilation[i] - pads[i]
    taps *= int(np.sum(where % lhs_dilation[i] == 0))
  rows = int(np.prod(out)) // int(np.prod(
      [out[out_labels.index(c)] for c in spatial]))
  return rows * rhs[rhs_labels.index('i')] * taps


def _dims(shape: str) -> list[int]:
  (dims,) = _ARRAY.findall(shape)
  return [int(d) for d in dims.split(',') if d]


def collective_lines(hlo: str, kind: str) -> list[str]:
  """The instructions of compiled HLO text that are collectives of ``kind``."""
  return [line for line in hlo.splitlines()
          if (match := _COLLECTIVE.match(line)) and match.group(2) == kind]


def shape_of(line: str) -> str:
  """The result shape of one instruction line."""
  return _COLLECTIVE.match(line).group(1)


def replica_groups(line: str, mesh) -> list[list[int]]:
  """The groups of device ids (positions in ``mesh.devices``, row-major) a
  collective runs over, from any of XLA's spellings: explicit
  ``{{0,1},{2,3}}``, iota ``[2,2]<=[4]`` (optionally transposed) or
  ``mesh[...] {'axis_1'}`` over the mesh's axes."""
  match = re.search(r'replica_groups=(\{\{[\d,{}]*\}\})', line)
  if match:
    return [[int(d) for d in group.split(',')]
            for group in re.findall(r'\{([\d,]+)\}', match.group(1))]
  match = re.search(r'replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?',
                    line)
  if match:
    groups = [int(d) for d in match.group(1).split(',')]
    ids = np.arange(int(np.prod(groups))).reshape(
        [int(d) for d in match.group(2).split(',')])
    if match.group(3):
      ids = ids.transpose([int(d) for d in match.group(3).split(',')])
    return ids.reshape(groups).tolist()
  match = re.search(r"replica_groups=mesh\[([^\]]*)\]"
                    r"(?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?"
                    r" \{([^}]*)\}", line)
  axes, iota, permutation, over = match.groups()
  sizes = [int(n) for n in re.findall(r"=(\d+)", axes)]
  names = re.findall(r"'(\w+)'=", axes)
  ids = np.arange(int(np.prod(sizes)))
  if iota:  # the devices in the mesh's order: an iota, reshaped, transposed
    ids = ids.reshape([int(d) for d in iota.split(',')])
    if permutation:
      ids = ids.transpose([int(d) for d in permutation.split(',')])
  ids = ids.reshape(sizes)
  over = [names.index(a) for a in re.findall(r"'(\w+)'", over)]
  rest = [a for a in range(len(sizes)) if a not in over]
  return ids.transpose(rest + over).reshape(
      -1, int(np.prod([sizes[a] for a in over]))).tolist()


def partitioned(lowered, dump_dir) -> str:
  """The per-device program right after SPMD partitioning, before the
  backend's passes: the collectives as the partitioner placed them, in the
  program's dtypes (XLA:CPU later computes bfloat16 in float32, a GPU or TPU
  does not). Compiles ``lowered`` afresh, dumping into ``dump_dir``."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  # A program read from the persistent cache runs no passes and dumps
  # nothing (dump flags are not part of its key): compile with it off.
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  compilation_cache.reset_cache()
  try:
    lowered.compile(compiler_options={
        'xla_dump_to': str(dump_dir), 'xla_dump_hlo_as_text': True,
        'xla_dump_hlo_pass_re': 'spmd-partitioning'})
  finally:
    jax.config.update('jax_enable_compilation_cache', enabled)
    compilation_cache.reset_cache()
  (path,) = pathlib.Path(dump_dir).glob('*after_spmd-partitioning*.txt')
  return path.read_text()
