"""Writes ``.pth`` files the way ``torch.save`` does, without torch.

A PyTorch checkpoint is a zip archive: ``<name>/data.pkl`` (a protocol-2
pickle in which every tensor is a call of ``torch._utils._rebuild_tensor_v2``
on a storage given by persistent id ``('storage', torch.FloatStorage, key,
location, numel)``) and one raw little-endian file ``<name>/data/<key>`` per
storage. Tests use it to write checkpoints laid out as the official training
scripts write them, with objects of classes that are not installed here (a
yacs ``CfgNode``, an OmegaConf ``DictConfig``): ``stand_in`` classes pickle
under those modules' and classes' names. Checked once by hand against torch
2.13: ``torch.load`` reads what ``save`` writes (tensors, dtypes, strides,
``_metadata``), and real yacs ``CfgNode`` and OmegaConf objects saved by
``torch.save`` take the same pickle paths as their stand-ins here.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

_STORAGES = {
    np.dtype(np.float32): 'FloatStorage', np.dtype(np.float64): 'DoubleStorage',
    np.dtype(np.float16): 'HalfStorage',
    np.dtype(ml_dtypes.bfloat16): 'BFloat16Storage',
    np.dtype(np.int64): 'LongStorage', np.dtype(np.int32): 'IntStorage',
    np.dtype(np.uint8): 'ByteStorage', np.dtype(np.bool_): 'BoolStorage',
}


class Global:
  """A module-level name (class or function) that pickles as ``module.name``
  without being importable here."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle wants a reduce function to be callable
    raise TypeError(f'{self.module}.{self.name} is only a name here.')


def stand_in(module: str, name: str, base: type = object) -> type:
  """A class that pickles as ``module.name``: instances reduce to
  ``copyreg.__newobj__`` of it, their ``__dict__`` and, for a dict base, their
  items, as instances of the real class do."""
  return type(name, (base,), {'_pickle_as': Global(module, name)})


class Tensor:
  """A torch tensor: its values and the device it was saved from."""

  def __init__(self, value, device: str = 'cpu'):
    self.value = np.asarray(value)
    self.device = device


_REBUILD_TENSOR = Global('torch._utils', '_rebuild_tensor_v2')


class _Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """The pure-Python pickler, with torch's tensors and named stand-ins."""

  def __init__(self, file, storages: list[np.ndarray]):
    super().__init__(file, protocol=2)
    self._storages = storages

  def save(self, obj, save_persistent_id=True):
    marker = obj if isinstance(obj, Global) else getattr(
        obj, '_pickle_as', None) if isinstance(obj, type) else None
    if isinstance(marker, Global):
      self.write(pickle.GLOBAL + f'{marker.module}\n{marker.name}\n'.encode())
      return
    super().save(obj, save_persistent_id)

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      return ('storage', Global('torch', _STORAGES[obj.data.dtype]),
              str(obj.key), obj.device, obj.data.size)
    return None

  def reducer_override(self, obj):
    if isinstance(obj, Tensor):
      data = np.ascontiguousarray(obj.value)
      storage = _Storage(len(self._storages), data.ravel(), obj.device)
      self._storages.append(storage.data)
      strides = tuple(s // data.itemsize for s in data.strides)
      return (_REBUILD_TENSOR, (storage, 0, data.shape, strides, False,
                                collections.OrderedDict()))
    return NotImplemented


class _Storage:

  def __init__(self, key: int, data: np.ndarray, device: str):
    self.key, self.data, self.device = key, data, device


def save(obj: Any, path, archive: str = 'archive') -> None:
  """``torch.save(obj, path)`` for ``obj`` made of dicts, lists, numbers,
  strings, ``Tensor`` and stand-in instances."""
  storages: list[np.ndarray] = []
  pickled = io.BytesIO()
  _Pickler(pickled, storages).dump(obj)
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as z:
    z.writestr(f'{archive}/data.pkl', pickled.getvalue())
    z.writestr(f'{archive}/byteorder', 'little')
    for key, data in enumerate(storages):
      z.writestr(f'{archive}/data/{key}', data.tobytes())  # little-endian
    z.writestr(f'{archive}/version', '3\n')


def state_dict(arrays: dict[str, np.ndarray], prefix: str = '',
               device: str = 'cpu') -> collections.OrderedDict:
  """A module's ``state_dict()``: an OrderedDict of tensors, with the
  ``_metadata`` attribute torch gives it."""
  sd = collections.OrderedDict(
      (prefix + k, Tensor(v, device)) for k, v in arrays.items())
  sd._metadata = collections.OrderedDict(  # pylint: disable=protected-access
      [('', {'version': 1})])
  return sd


def adamw_state(arrays: dict[str, np.ndarray], lr: float) -> dict:
  """``torch.optim.AdamW.state_dict()`` after some steps: per-parameter
  moments by index, and the parameter groups."""
  return {
      'state': {i: {'step': Tensor(np.float32(10)),
                    'exp_avg': Tensor(np.zeros_like(v)),
                    'exp_avg_sq': Tensor(np.zeros_like(v))}
                for i, v in enumerate(arrays.values())},
      'param_groups': [{'lr': lr, 'betas': (0.9, 0.999), 'eps': 1e-8,
                        'weight_decay': 0.05, 'amsgrad': False,
                        'params': list(range(len(arrays)))}],
  }
