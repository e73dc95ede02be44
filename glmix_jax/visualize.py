r"""Pictures of what a trained model does: GLMix slot maps, ACmix path rates.

  python -m glmix_jax.visualize --config=configs/demo.py \
      --checkpoint=/tmp/glmix_demo --image=photo.jpg --out=slots.png

``--checkpoint`` is a model checkpoint (from ``python -m glmix_jax.convert``)
or a ``train.py`` workdir, whose latest step is shown with its EMA weights when
the run kept them (``--weights=raw`` for the others). The image (any file
Pillow reads) goes through the config's evaluation transform, and the figure
shows that crop, the pixels the model saw.

For each chosen GLMix block (``--blocks``, default the last GLMix block of
each stage), a row:

* the image with every pixel coloured by its dominant slot: the argmax of the
  dispatch weights (softmax over the 64 slots), nearest-upsampled from the
  block's grid; the legend names the slots covering most pixels;
* heat maps of the clustering weights (softmax over pixels: where a slot
  gathers its content from) of the ``--slots`` most-used slots, each titled
  and framed in its overlay colour.

An ACmix config has no slots; the command then draws the learned weights of
the two paths (rate1: attention, rate2: convolution) of every ACmix layer.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import matplotlib.image
from matplotlib import colormaps
from matplotlib import patches
from matplotlib.figure import Figure

from glmix_jax import inference
from glmix_jax.models import acmix

# 64 distinguishable colours for 64 slots: the qualitative tab20 families.
SLOT_COLOURS = np.concatenate(
    [colormaps[name].colors for name in ('tab20', 'tab20b', 'tab20c')]
    + [colormaps['Dark2'].colors[:4]])[:, :3]
LEGEND_SLOTS = 8
HEAT_COLORMAP = 'inferno'


def default_blocks(names: Sequence[str]) -> list[str]:
  """The last GLMix block of each stage, from names like 'stages.2.blocks.4'."""
  last = {}
  for name in names:  # in network order
    last[name.split('.')[1]] = name
  return list(last.values())


def choose_blocks(available: Sequence[str], requested: str) -> list[str]:
  """Block names from ``--blocks``: '' (the default), 'all', or a comma list
  of names ('stages.2.blocks.0') or their 'stage.block' short form ('2.0')."""
  if not requested:
    return default_blocks(available)
  if requested == 'all':
    return list(available)
  chosen = []
  for item in requested.split(','):
    name = item.strip()
    if name.count('.') == 1:
      name = 'stages.{}.blocks.{}'.format(*name.split('.'))
    if name not in available:
      raise ValueError(f'No GLMix block {item.strip()!r}; this model has '
                       f'{", ".join(available)}.')
    chosen.append(name)
  return chosen


def _show_on_grid(ax, pixels: np.ndarray, grid_image: np.ndarray,
                  **imshow_args) -> matplotlib.image.AxesImage:
  """``grid_image`` (h, w[, 3]) over the picture, nearest-upsampled: each grid
  cell covers its share of the pixels (the extent maps cell edges to image
  edges, also when the size is no multiple of the grid)."""
  height, width = pixels.shape[:2]
  ax.imshow(pixels, cmap='gray')
  image = ax.imshow(grid_image, extent=(0, width, height, 0),
                    interpolation='nearest', **imshow_args)
  ax.set_xticks([])
  ax.set_yticks([])
  return image


def slot_figure(pixels: np.ndarray, slots: dict[str, inference.SlotWeights],
                blocks: Sequence[str], *, heat_maps: int = 16,
                title: str = '') -> Figure:
  """The slot maps of ``blocks`` for one image (batch entry 0).

  Args:
    pixels: the (S, S, 3) uint8 crop the model saw.
    slots: ``inference.predict(...).slots``.
    blocks: names of the blocks to draw, one row each.
    heat_maps: how many of the most-used slots get a heat map.
    title: the figure's title.
  """
  columns = max(1, (heat_maps + 1) // 2)
  fig = Figure(figsize=(3.2 + 1.25 * columns, 3.4 * len(blocks)),
               layout='constrained')
  fig.suptitle(title)
  gray = pixels.mean(axis=-1)
  for row, name in zip(np.atleast_1d(fig.subfigures(len(blocks), 1)), blocks):
    dispatch = slots[name].dispatch[0]  # (S, h, w)
    clustering = slots[name].clustering[0]
    num_slots, h, w = dispatch.shape
    dominant = dispatch.argmax(axis=0)
    share = np.bincount(dominant.ravel(), minlength=num_slots) / dominant.size
    # Most pixels first; among slots owning none, most dispatch weight.
    ranked = np.lexsort((-dispatch.sum(axis=(1, 2)), -share))
    overlay_fig, heat_fig = row.subfigures(1, 2, width_ratios=(3.2, 1.25 * columns))
    row.suptitle(f'{name}: {h}x{w} grid, {num_slots} slots',
                 fontweight='bold')

    ax = overlay_fig.subplots()
    _show_on_grid(ax, pixels, SLOT_COLOURS[dominant], alpha=0.55)
    ax.set_title('dominant slot per pixel\n(argmax of dispatch weights)',
                 fontsize=9)
    shown = [s for s in ranked[:LEGEND_SLOTS] if share[s] > 0]
    ax.legend(handles=[patches.Patch(color=SLOT_COLOURS[s],
                                     label=f'slot {s}: {share[s]:.0%}')
                       for s in shown],
              title='pixels per slot', fontsize=7, title_fontsize=7,
              loc='upper left', bbox_to_anchor=(1.0, 1.0), frameon=False)

    axes = heat_fig.subplots(2, columns, squeeze=False).ravel()
    heat_fig.suptitle(f'where the {min(heat_maps, num_slots)} most-used '
                      'slots gather from\n(clustering weights: softmax over '
                      'pixels)', fontsize=9)
    for ax, s in zip(axes, ranked[:heat_maps]):
      weights = clustering[s] / clustering[s].max()
      image = _show_on_grid(ax, gray, weights, cmap=HEAT_COLORMAP, alpha=0.75,
                            vmin=0.0, vmax=1.0)
      ax.set_title(f'slot {s} ({share[s]:.0%})', fontsize=8)
      for spine in ax.spines.values():
        spine.set_edgecolor(SLOT_COLOURS[s])
        spine.set_linewidth(2.5)
    for ax in axes[heat_maps:]:
      ax.set_visible(False)
    heat_fig.colorbar(image, ax=axes.tolist(), shrink=0.8,
                      label="weight / slot's max")
  return fig


def rates_figure(rates: dict[str, tuple[float, float]], *,
                 title: str = '') -> Figure:
  """A bar chart of each ACmix layer's path weights (``acmix.path_rates``)."""
  names = list(rates)
  values = np.asarray([rates[n] for n in names])  # (layers, 2)
  y = np.arange(len(names))
  fig = Figure(figsize=(7, 1.2 + 0.32 * len(names)), layout='constrained')
  ax = fig.subplots()
  for k, (label, colour) in enumerate((('rate1 (attention path)', 'tab:blue'),
                                       ('rate2 (convolution path)',
                                        'tab:orange'))):
    ax.barh(y + (k - 0.5) * 0.4, values[:, k], height=0.4, label=label,
            color=colour)
  ax.set_yticks(y, names, fontsize=8)
  ax.invert_yaxis()  # first layer on top
  ax.axvline(0.5, color='gray', linewidth=0.8, linestyle=':')
  ax.set_xlabel('learned weight (both start at 0.5)')
  ax.legend(loc='lower right', fontsize=8)
  ax.set_title(title or 'ACmix: output = rate1 * attention + rate2 * conv')
  return fig


def curves_figure(history: dict[str, list[tuple[int, float]]]) -> Figure:
  """Training curves from ``{metric: [(step, value), ...]}`` as collected
  from ``train_lib.train_and_evaluate(..., on_metrics=...)``: the loss, and
  the training batch accuracy with the evaluations' top-1 (every
  ``<evaluation>_loss`` and ``<evaluation>_top1``, raw and EMA)."""
  fig = Figure(figsize=(10, 3.2), layout='constrained')
  loss_ax, accuracy_ax = fig.subplots(1, 2)
  for ax, train_metric, eval_suffix, ylabel in (
      (loss_ax, 'loss', '_loss', 'cross-entropy'),
      (accuracy_ax, 'accuracy', '_top1', 'accuracy')):
    evaluations = sorted(m for m in history if m.endswith(eval_suffix))
    for metric in (train_metric, *evaluations):
      if history.get(metric):
        steps, values = zip(*history[metric])
        ax.plot(steps, values, '-' if metric == train_metric else 'o-',
                label=metric)
    ax.set_xlabel('step')
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=8)
  return fig


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
  """The figure as PNG. The figures are plain ``Figure`` objects, not pyplot
  ones, so no GUI backend is involved: Matplotlib's Agg canvas renders them,
  on a headless machine too."""
  out = io.BytesIO()
  fig.savefig(out, format='png', dpi=dpi)
  return out.getvalue()


def top_classes(probabilities: np.ndarray, k: int = 5) -> list[tuple[int, float]]:
  """The ``k`` most probable (class index, probability) of one image."""
  order = np.argsort(-probabilities)[:k]
  return [(int(c), float(probabilities[c])) for c in order]


def draw(config, checkpoint: str, image: str | None, *, blocks: str = '',
         heat_maps: int = 16, weights: str = 'ema'
         ) -> tuple[Figure, list[tuple[int, float]]]:
  """The command's figure for a config and checkpoint, and the image's top
  classes (none for an ACmix rates figure, which needs no image).

  Raises:
    ValueError: a GLNet without ``image``, unknown blocks, and the errors of
      ``inference.load_model`` / ``inference.load_image``.
    FileNotFoundError: a missing checkpoint or image.
  """
  if image is not None:  # a bad file fails before the slower model loading
    inputs, pixels = inference.load_image(image, config)
  loaded = inference.load_model(config, checkpoint, weights=weights)
  source = f'{config.model_name} ({loaded.source})'
  top, prediction = [], None
  if image is not None:
    prediction = inference.predict(loaded, inputs[None])
    top = top_classes(prediction.probabilities[0])
  rates = acmix.path_rates(loaded.variables['params'])
  if rates:
    return rates_figure(rates, title=f'{source}: learned path weights'), top
  if prediction is None:
    raise ValueError('--image is required for slot maps.')
  if not prediction.slots:
    raise ValueError(f'{config.model_name} has no GLMix blocks, so no slot '
                     'maps; slot maps exist for the GLNet models.')
  names = choose_blocks(list(prediction.slots), blocks)
  label, probability = top[0]
  fig = slot_figure(
      pixels, prediction.slots, names, heat_maps=heat_maps,
      title=f'{source} on {image.rsplit("/", 1)[-1]}: class {label} '
      f'({probability:.0%})')
  return fig, top


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  fig, top = draw(f.config, f.checkpoint, f.image, blocks=f.blocks,
                  heat_maps=f.slots, weights=f.weights)
  out = epath.Path(f.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_bytes(png_bytes(fig, dpi=f.dpi))
  if top:
    print('top classes: ' + '  '.join(f'{c} {p:.1%}' for c, p in top))
  print(f'wrote {out}')


if __name__ == '__main__':
  # pylint: disable=g-import-not-at-top
  from absl import flags
  from ml_collections import config_flags
  from glmix_jax import cli
  # pylint: enable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Config file.',
                                  lock_config=True)
  flags.DEFINE_string('checkpoint', None, 'A model checkpoint directory or a '
                      'train.py workdir.', required=True)
  flags.DEFINE_string('image', None, 'Image file (JPEG, PNG, ...); optional '
                      'for ACmix, whose figure needs none.')
  flags.DEFINE_string('out', 'slots.png', 'PNG file to write.')
  flags.DEFINE_string('blocks', '', "GLMix blocks: 'stages.2.blocks.0' or "
                      "'2.0', comma-separated, or 'all' (default: the last "
                      'of each stage).')
  flags.DEFINE_integer('slots', 16, 'Heat maps per block (most-used slots).')
  flags.DEFINE_integer('dpi', 100, 'Resolution of the PNG.')
  flags.DEFINE_enum('weights', 'ema', ['ema', 'raw'], 'For a train.py '
                    'workdir: its EMA weights (when kept) or the raw ones.')
  cli.run(main)
