"""Read PyTorch-style weight files into flat ``{key: numpy array}`` mappings.

Supported: ``.pth`` / ``.pt`` / ``.pth.tar`` (PyTorch's zip format, read
*without* torch), ``.npz`` and ``.safetensors``. The official training
scripts save dicts that hold the state dict under one entry beside optimizer,
scheduler and config entries; ``read_state_dict`` finds it:

* GLMix ``main_cx2.py`` / ``main_tklb.py`` (ConvNeXt-V2's ``utils.save_model``):
  ``model``, ``model_ema``, ``optimizer``, ``scaler``, ``epoch``, ``args``;
* ACmix-Swin (the Swin pipeline's ``utils.save_checkpoint``): ``model``,
  ``optimizer``, ``lr_scheduler``, ``max_accuracy``, ``epoch``, ``config`` (a
  yacs ``CfgNode``), ``amp``;
* ACmix-ResNet (``ResNet/main.py``, ``checkpoint.pth.tar``): ``state_dict``
  with the ``module.`` prefix of ``DataParallel`` / DDP, ``optimizer``,
  ``epoch``, ``arch``, ``best_acc1``.

The ``.pth`` reader unpickles with a restricted unpickler: tensors and the few
containers a state dict needs are rebuilt as numpy arrays, and every other
class (optimizer state, argparse namespaces, yacs or OmegaConf configs) becomes
an inert placeholder that accepts and drops whatever the pickle puts in it. No
code from the file is ever imported or run. Files in PyTorch's legacy
(pre-1.6, non-zip) format are read through torch when it is installed.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from typing import Any, Mapping

import ml_dtypes
import numpy as np
from etils import epath

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64,
    'HalfStorage': np.float16, 'BFloat16Storage': ml_dtypes.bfloat16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


class WeightFileError(ValueError):
  """A weight file that cannot be read or has no usable state dict."""


class _Opaque:
  """Stands in for any pickled class a state dict does not need, and for its
  instances: whatever the pickle builds them from (constructor arguments,
  state, dict items of a dict subclass such as a yacs ``CfgNode``, list items
  of a list subclass) is dropped."""

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    del state

  def __setitem__(self, key, value):
    del key, value

  def append(self, item):
    del item

  def extend(self, items):
    del items

  def __call__(self, *args, **kwargs):
    return _Opaque()


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """Strided view of a flat storage, copied to a C-contiguous array."""
  if not size:
    return np.array(storage[offset], dtype=storage.dtype)
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=tuple(size),
      strides=tuple(s * itemsize for s in stride))
  return np.ascontiguousarray(view)


def _rebuild_parameter(data, *unused):
  return data


class _StorageType:

  def __init__(self, name: str):
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _StateDictUnpickler(pickle.Unpickler):
  """Rebuilds tensors from a PyTorch zip archive as numpy arrays."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
    super().__init__(file)
    self._archive = archive
    self._prefix = prefix
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    if module == 'collections' and name == 'OrderedDict':
      return collections.OrderedDict
    if module == 'torch._utils' and name == '_rebuild_tensor_v2':
      return _rebuild_tensor
    if module == 'torch._utils' and name == '_rebuild_parameter':
      return _rebuild_parameter
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    return _Opaque

  def persistent_load(self, pid) -> np.ndarray:
    kind, storage_type, key = pid[0], pid[1], pid[2]
    if kind != 'storage' or not isinstance(storage_type, _StorageType):
      raise WeightFileError(f'unsupported storage record {pid[:2]!r}')
    if key not in self._storages:
      raw = self._archive.read(f'{self._prefix}data/{key}')
      self._storages[key] = np.frombuffer(raw, storage_type.dtype)
    return self._storages[key]


def _read_pth(path: epath.Path) -> Any:
  with path.open('rb') as f:
    if not zipfile.is_zipfile(f):
      return _read_legacy_pth(path)
    f.seek(0)
    with zipfile.ZipFile(f) as archive:
      pickles = [n for n in archive.namelist() if n.endswith('/data.pkl')]
      if len(pickles) != 1:
        raise WeightFileError(f'{path}: not a PyTorch checkpoint archive '
                              '(no single */data.pkl inside).')
      prefix = pickles[0][:-len('data.pkl')]
      with archive.open(pickles[0]) as pkl:
        return _StateDictUnpickler(pkl, archive, prefix).load()


def _read_legacy_pth(path: epath.Path) -> Any:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise WeightFileError(
        f'{path} is in PyTorch\'s legacy (pre-1.6) format, which needs torch '
        'to read: pip install torch (the CPU build is enough).') from e
  with path.open('rb') as f:
    obj = torch.load(f, map_location='cpu', weights_only=True)
  return _tensors_to_numpy(obj)


def _tensors_to_numpy(obj):
  if isinstance(obj, Mapping):
    return {k: _tensors_to_numpy(v) for k, v in obj.items()}
  if hasattr(obj, 'detach'):
    return obj.detach().float().numpy() if str(obj.dtype) == 'torch.bfloat16' \
        else obj.detach().numpy()
  return obj


def _read_npz(path: epath.Path) -> dict[str, np.ndarray]:
  with path.open('rb') as f, np.load(f) as npz:
    return {k: npz[k] for k in npz.files}


def _read_safetensors(path: epath.Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load  # pylint: disable=g-import-not-at-top
  return load(path.read_bytes())


_READERS = {'.pth': _read_pth, '.pt': _read_pth, '.bin': _read_pth,
            '.tar': _read_pth,  # ResNet/main.py's checkpoint.pth.tar
            '.npz': _read_npz, '.safetensors': _read_safetensors}


def read_file(path: str | epath.Path) -> Any:
  """The raw content of a weight file (nested dicts of numpy arrays)."""
  path = epath.Path(path)
  if not path.exists():
    raise WeightFileError(f'Checkpoint file {path} does not exist.')
  reader = _READERS.get(path.suffix)
  if reader is None:
    raise WeightFileError(f'{path}: unknown weight file type {path.suffix!r}; '
                          f'use one of {", ".join(sorted(_READERS))}.')
  try:
    return reader(path)
  except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, OSError,
          KeyError) as e:
    raise WeightFileError(f'{path}: cannot read it as {path.suffix} ({e}).') \
        from e


def _is_state_dict(obj) -> bool:
  return isinstance(obj, Mapping) and bool(obj) and all(
      isinstance(v, np.ndarray) for v in obj.values())


# Where the official scripts keep the weights, tried in this order when no
# entry is given: the trained model, then its EMA (timm's CheckpointSaver
# name too).
STATE_DICT_ENTRIES = ('model', 'state_dict', 'model_ema', 'state_dict_ema')
# The prefix nn.DataParallel and DistributedDataParallel give every key.
_WRAPPER_PREFIX = 'module.'


def _entry(content: Mapping, entry: str) -> dict[str, Any]:
  """``content[entry]``, or in flat files (npz, safetensors) the keys under
  the prefix ``entry/``."""
  if isinstance(content.get(entry), Mapping):
    return dict(content[entry])
  prefix = entry.rstrip('/') + '/'
  return {k[len(prefix):]: v for k, v in content.items()
          if isinstance(k, str) and k.startswith(prefix)}


def _unwrapped(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  if all(k.startswith(_WRAPPER_PREFIX) for k in state_dict):
    return {k[len(_WRAPPER_PREFIX):]: v for k, v in state_dict.items()}
  return state_dict


def select_state_dict(content: Any, entry: str | None, *,
                      default_entry: str = 'model',
                      source: str = 'checkpoint') -> dict[str, np.ndarray]:
  """The state dict inside ``content``, without a ``module.`` prefix.

  ``entry`` names the sub-dict (``'model'``, ``'model_ema'``, ``'state_dict'``);
  in flat files (npz, safetensors) it is a key prefix (``'sd'`` selects the
  ``'sd/...'`` keys). Without ``entry``, a bare state dict is returned as it
  is, and a checkpoint dict gives the first of ``default_entry`` (the entry of
  the released weights) and ``STATE_DICT_ENTRIES`` that holds one.
  """
  if not isinstance(content, Mapping):
    raise WeightFileError(f'{source} holds a {type(content).__name__}, not a '
                          'dict of tensors.')
  keys = ', '.join(map(str, list(content)[:10]))
  if entry is not None:
    selected = _entry(content, entry)
    if not _is_state_dict(selected):
      raise WeightFileError(
          f'{source} has no state dict under entry {entry!r}; choose one with '
          f'--entry (top-level keys: {keys}).')
    return _unwrapped(selected)
  if _is_state_dict(content):
    return _unwrapped(dict(content))
  for name in dict.fromkeys((default_entry, *STATE_DICT_ENTRIES)):
    selected = _entry(content, name)
    if _is_state_dict(selected):
      return _unwrapped(selected)
  raise WeightFileError(
      f'{source} has no state dict under any of the entries '
      f'{", ".join(dict.fromkeys((default_entry, *STATE_DICT_ENTRIES)))}; '
      f'name the entry that holds it with --entry (top-level keys: {keys}).')


def read_state_dict(path: str | epath.Path, entry: str | None = None, *,
                    default_entry: str = 'model') -> dict[str, np.ndarray]:
  """The state dict in the weight file ``path`` (see ``select_state_dict``)."""
  return select_state_dict(read_file(path), entry, default_entry=default_entry,
                           source=str(path))
