"""Writes tests/data/glnet_stl_tiny_checkpoint.pth with real PyTorch.

Run once by hand (``pip install torch``; the tests themselves need no torch):

  python tests/data/make_pth_fixture.py

The file is laid out like an official GLNet checkpoint: the state dict of the
``glnet_stl_tiny`` reference fixture under ``model``, plus entries a reader
must get past (an argparse namespace, an optimizer-like dict, a scalar). Under
``extras`` it holds tensors that exercise the storage layouts the reader must
rebuild: a permuted (non-contiguous) tensor, a view at an offset into a shared
storage, a 0-d tensor, bfloat16 and int64.
"""

import argparse
import collections
import pathlib

import numpy as np
import torch

here = pathlib.Path(__file__).parent
fixture = np.load(here / 'glnet_stl_tiny.npz')
state_dict = collections.OrderedDict(
    (k[3:], torch.from_numpy(fixture[k])) for k in fixture.files
    if k.startswith('sd/'))
base = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
extras = {
    'permuted': base.permute(2, 0, 1),
    'offset_view': base.view(-1)[5:17].view(3, 4),
    'scalar': torch.tensor(3.5),
    'bfloat16': torch.tensor([1.5, -2.25], dtype=torch.bfloat16),
    'int64': torch.arange(5),
}
torch.save({
    'model': state_dict,
    'extras': extras,
    'optimizer': {'state': {0: {'step': torch.tensor(7.0)}}, 'param_groups': []},
    'args': argparse.Namespace(lr=2e-3, model='glnet_stl'),
    'epoch': 7,
}, here / 'glnet_stl_tiny_checkpoint.pth')
