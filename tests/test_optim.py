"""Schedules and weight-decay masks reproduce the official recipes."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from glmix_jax import models, optim


def test_glnet_schedule_matches_convnextv2_adjust_learning_rate():
  # 300 epochs x 100 steps, 5 warm-up epochs, peak 2e-3, min 1e-5.
  lr = optim.warmup_cosine(2e-3, total=30000, warmup=500, end=1e-5)
  def official(t):  # ConvNeXt-V2 utils.adjust_learning_rate, epoch = t / 100
    epoch = t / 100
    if epoch < 5:
      return 2e-3 * epoch / 5
    return 1e-5 + (2e-3 - 1e-5) * 0.5 * (
        1 + math.cos(math.pi * (epoch - 5) / 295))
  for t in (0, 1, 250, 499, 500, 501, 10000, 29999, 30000):
    np.testing.assert_allclose(lr(t), official(t), rtol=1e-5, atol=1e-12)


def test_swin_schedule_has_no_warmup_prefix():
  # timm CosineLRScheduler(t_initial=T, warmup_t=W, warmup_prefix=False)
  lr = optim.timm_cosine(1e-3, total=3000, warmup=200, end=1e-5,
                         warmup_from=1e-6)
  np.testing.assert_allclose(lr(0), 1e-6, rtol=1e-5)
  np.testing.assert_allclose(lr(100), 1e-6 + 100 * (1e-3 - 1e-6) / 200,
                             rtol=1e-5)
  after = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 200 / 3000))
  np.testing.assert_allclose(lr(200), after, rtol=1e-5)
  assert float(lr(200)) < 0.99 * 1e-3  # already below peak after warm-up


def test_per_epoch_schedule_is_constant_within_an_epoch():
  """timm's per-epoch CosineLRScheduler (50 steps an epoch): epoch e's value
  for all its steps; warm-up epochs 0-4 from 1e-6, then the cosine from
  epoch 5 of 310 (no warm-up prefix)."""
  lr = optim.timm_cosine(2e-3, total=310, warmup=5, end=1e-5,
                         warmup_from=1e-6, steps_per_update=50)
  def official(epoch):
    if epoch < 5:
      return 1e-6 + epoch * (2e-3 - 1e-6) / 5
    return 1e-5 + 0.5 * (2e-3 - 1e-5) * (1 + math.cos(math.pi * epoch / 310))
  for step in (0, 49, 50, 99, 100, 249, 250, 299, 300, 15499):
    np.testing.assert_allclose(lr(step), official(step // 50), rtol=1e-5)
  assert float(lr(50)) == float(lr(99)) != float(lr(100))


def decayed(rule, name='glnet_16g'):
  model = models.build(name, dims=(32, 64, 96, 128), depths=(1, 1, 2, 1),
                       slot_init='learned' if name == 'glnet_stl' else 'pool')
  params = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))['params']
  mask = optim.weight_decay_mask(params, rule)
  return mask['stages_0']['blocks_0'], mask


def test_convnextv2_rule_decays_slot_scale_but_not_layer_scale():
  block, mask = decayed('convnextv2')
  assert block['slot_scale'] and block['mlp_0']['kernel']
  assert not block['ls1']['gamma'] and not block['mlp_0']['bias']
  assert not block['norm1']['scale'] and not mask['norm']['scale']
  learned, _ = decayed('convnextv2', 'glnet_stl')
  assert learned['init_slots']


def test_timm_rule_does_not_decay_slot_scale():
  block, _ = decayed('timm')
  assert not block['slot_scale'] and block['relation_mha']['in_proj']['kernel']
  assert not block['relation_mha']['in_proj']['bias']


def test_unknown_rule_names_the_choices():
  with pytest.raises(ValueError, match='convnextv2, timm, swin, all'):
    optim.weight_decay_mask({'w': jnp.zeros(3)}, 'adam')


def test_adamw_decay_is_multiplied_by_the_learning_rate():
  cfg = ml_collections.ConfigDict(dict(
      name='adamw', b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05,
      weight_decay_rule='timm', grad_clip_norm=0.0, layer_decay=1.0))
  params = {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)}
  opt = optim.make_optimizer(cfg, lambda step: 0.1, params)
  zero = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = opt.update(zero, opt.init(params), params)
  np.testing.assert_allclose(updates['kernel'], -0.1 * 0.05)  # torch AdamW
  np.testing.assert_allclose(updates['bias'], 0.0)


def test_sgd_adds_l2_before_momentum_like_torch():
  cfg = ml_collections.ConfigDict(dict(
      name='sgd', momentum=0.9, weight_decay=1e-4, weight_decay_rule='all',
      grad_clip_norm=0.0, layer_decay=1.0))
  params = {'w': jnp.full((3,), 2.0)}
  opt = optim.make_optimizer(cfg, lambda step: 0.1, params)
  state = opt.init(params)
  grads = {'w': jnp.full((3,), 0.5)}
  buf = 0.0
  for _ in range(3):  # torch: buf = 0.9 buf + (g + wd p); p -= lr buf
    updates, state = opt.update(grads, state, params)
    buf = 0.9 * buf + (0.5 + 1e-4 * float(params['w'][0]))
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(updates['w'], -0.1 * buf, rtol=1e-6)
