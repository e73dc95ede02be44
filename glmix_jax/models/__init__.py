"""The model registry: ``build(name, **overrides)`` and ``list_models()``.

Each family module contributes a variants table (name -> constructor
arguments) per Flax module class (``glnet.VARIANTS``,
``acmix_resnet.VARIANTS`` ...); ``build`` looks a name up and applies the
caller's overrides, which may be any field of that class (``num_classes``,
``drop_path_rate``, ``dtype``, ``dims``, ``depths`` ...).
"""

from __future__ import annotations

import dataclasses
import fnmatch

import flax.linen as nn

from glmix_jax.models import acmix, acmix_resnet, acmix_swin, glnet

_FAMILIES: tuple[tuple[type[nn.Module], dict[str, dict]], ...] = (
    (glnet.GLNet, glnet.VARIANTS),
    (acmix.ACmix, acmix.MODULE_VARIANTS),
    (acmix_resnet.ACmixResNet, acmix_resnet.VARIANTS),
    (acmix_swin.ACmixSwin, acmix_swin.VARIANTS),
)

_REGISTRY: dict[str, tuple[type[nn.Module], dict]] = {
    name: (cls, args) for cls, variants in _FAMILIES
    for name, args in variants.items()
}


def list_models(pattern: str = '*') -> list[str]:
  """Registered model names matching a shell-style ``pattern``, sorted."""
  return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def model_fields(name: str) -> list[str]:
  """The fields ``build(name, ...)`` accepts as overrides."""
  cls, _ = _lookup(name)
  return [f.name for f in dataclasses.fields(cls)
          if f.name not in ('parent', 'name')]


def build(name: str, **overrides) -> nn.Module:
  """The registered model ``name``, with fields replaced by ``overrides``."""
  cls, defaults = _lookup(name)
  unknown = sorted(set(overrides) - set(model_fields(name)))
  if unknown:
    raise ValueError(f'Unknown field(s) {unknown} for model {name!r}; valid '
                     f'fields: {", ".join(model_fields(name))}.')
  return cls(**{**defaults, **overrides})


def _lookup(name: str) -> tuple[type[nn.Module], dict]:
  if name not in _REGISTRY:
    raise ValueError(f'Unknown model {name!r}; valid names: '
                     f'{", ".join(list_models())}.')
  return _REGISTRY[name]


def from_config(config) -> nn.Module:
  """The model a training config (``configs/*.py``) describes: the registered
  ``config.model_name`` with the ``config.model`` fields, and as many classes
  as ``config.data.num_classes``."""
  return build(config.model_name, num_classes=config.data.num_classes,
               **config.model.to_dict())
