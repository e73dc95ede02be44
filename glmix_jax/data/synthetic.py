r"""A synthetic mini-ImageNet in the real ImageNet archive format.

  python -m glmix_jax.data.synthetic --out=DIR [--classes=10] \
      [--images_per_class=260] [--image_size=96]
  python -m glmix_jax.data.synthetic --sample=FILE.png --label=5  # one picture
  python -m glmix_jax.data.synthetic --image_folder=DIR  # the second task

The first writes ``DIR/ILSVRC2012_img_train.tar``: one ``<wnid>.tar`` per class
holding ``<wnid>_<n>.JPEG`` files, exactly as ImageNet ships it, so the real
TFDS ``imagenet2012`` builder prepares it offline (``glmix_jax.data.prepare``).
The classes are the first ``classes`` WordNet ids of the builder's
``labels.txt``, so their TFDS labels are 0 .. classes - 1.

Each picture holds two objects on a textured background: a red disc (the
anchor) and a target shape of another colour. The class is the target's shape
(square, triangle, cross, ring, bar) *and* whether it lies above or below the
anchor, so a model must relate two objects across the image (global context),
not just detect a local pattern; sizes, positions, colours and the background
vary. Horizontal flips, as in the training recipe, keep the class.

A second task for fine-tuning demos, ``write_image_folder``: the same pictures
labelled by the target's shape alone (5 classes; above or below at random),
written as an image folder (``DIR/train/<shape>/*.jpg``, ``DIR/val/...``) for
``glmix_jax.data.prepare --image_folder``.

``label_in_pixels=True`` instead paints each image one flat colour that
encodes its label (``label_from_pixels`` reads it back after JPEG, resizing and
cropping); the end-to-end label tests use it.

The validation archive (``ILSVRC2012_img_val.tar``, which the TFDS builder
requires) always holds such flat label-in-pixels images: the builder labels the
k-th sorted validation file with the k-th line of its shipped
``validation_labels.txt``, whatever classes that names, so it cannot hold our
drawn classes. Hold out part of the train split to validate a model on them.
"""

from __future__ import annotations

import io
import tarfile

import numpy as np
from etils import epath
from PIL import Image, ImageDraw

SHAPES = ('square', 'triangle', 'cross', 'ring', 'bar')
MAX_DRAWN_CLASSES = 2 * len(SHAPES)
TRAIN_TAR = 'ILSVRC2012_img_train.tar'
VAL_TAR = 'ILSVRC2012_img_val.tar'


def _imagenet_files():
  # Imported here: TFDS is only needed to find the builder's label lists.
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common  # pylint: disable=g-import-not-at-top
  return imagenet_common


def wordnet_ids() -> list[str]:
  """The 1000 ImageNet WordNet ids in TFDS label order."""
  path = epath.Path(_imagenet_files().label_names_file())
  return path.read_text().split()


def validation_wnids() -> list[str]:
  """The WordNet id TFDS gives the k-th sorted validation file."""
  common = _imagenet_files()
  path = epath.Path(common.__file__).parent / 'validation_labels.txt'
  return path.read_text().split()


def _target_colour(rng: np.random.Generator,
                   background: np.ndarray) -> tuple[int, int, int]:
  """A colour that is neither anchor-red nor close to the background."""
  while True:
    c = rng.integers(0, 256, 3)
    red = c[0] > 150 and c[1] < 110 and c[2] < 110
    if not red and np.linalg.norm(c - background) > 120:
      return tuple(int(v) for v in c)


def _shape_and_relation(label: int) -> tuple[str, bool]:
  """The target shape of class ``label`` and whether it lies below the disc."""
  return SHAPES[label // 2], bool(label % 2)


def class_name(label: int) -> str:
  """What a drawn picture of class ``label`` shows: 'ring below the disc'."""
  shape, below = _shape_and_relation(label)
  return f'{shape} {"below" if below else "above"} the disc'


def draw_object_pair(label: int, size: int,
                     rng: np.random.Generator) -> Image.Image:
  """A textured picture of class ``label`` in [0, 10): shape and relation."""
  shape, target_below = _shape_and_relation(label)
  # Background: a random linear gradient plus mild noise.
  yy, xx = np.mgrid[0:size, 0:size] / size
  a, b = rng.uniform(-1, 1, 2)
  base = rng.uniform(60, 190, 3)
  grad = (a * xx + b * yy)[..., None] * rng.uniform(20, 60, 3)
  noise = rng.normal(0, 10, (size, size, 3))
  image = Image.fromarray(np.clip(base + grad + noise, 0, 255).astype(np.uint8))
  pen = ImageDraw.Draw(image)

  r = size * rng.uniform(0.13, 0.19)  # object half-size
  # The anchor and target sit in opposite halves (top / bottom), at
  # independent horizontal positions: horizontal flips keep the class.
  top_y = rng.uniform(r, size / 2 - r)
  bottom_y = rng.uniform(size / 2 + r, size - r)
  anchor_y, target_y = (top_y, bottom_y) if target_below else (bottom_y, top_y)
  anchor_x, target_x = rng.uniform(r, size - r, 2)
  red = (int(rng.integers(190, 256)), int(rng.integers(0, 60)),
         int(rng.integers(0, 60)))
  pen.ellipse([anchor_x - r, anchor_y - r, anchor_x + r, anchor_y + r],
              fill=red)

  colour = _target_colour(rng, base)
  x, y = target_x, target_y
  w = max(1, round(r / 3))
  if shape == 'square':
    pen.rectangle([x - r, y - r, x + r, y + r], fill=colour)
  elif shape == 'triangle':
    pen.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
  elif shape == 'cross':
    pen.rectangle([x - r, y - w, x + r, y + w], fill=colour)
    pen.rectangle([x - w, y - r, x + w, y + r], fill=colour)
  elif shape == 'ring':
    pen.ellipse([x - r, y - r, x + r, y + r], outline=colour, width=w)
  else:  # bar
    pen.rectangle([x - r, y - w, x + r, y + w], fill=colour)
  return image


def label_colour(label: int) -> tuple[int, int, int]:
  """The flat colour that encodes ``label`` (< 4096) in label-in-pixels mode."""
  return tuple(16 * (label // 16**k % 16) + 8 for k in range(3))


def label_from_pixels(image: np.ndarray) -> int:
  """The label of a label-in-pixels image, from RGB values in [0, 255]."""
  digits = (round((float(np.median(image[..., k])) - 8) / 16) for k in range(3))
  return sum(int(d) * 16**k for k, d in enumerate(digits))


def _jpeg(image: Image.Image) -> bytes:
  out = io.BytesIO()
  image.save(out, format='JPEG', quality=90)
  return out.getvalue()


def _draw(label: int, size: int, rng: np.random.Generator,
          label_in_pixels: bool) -> bytes:
  if label_in_pixels:
    return _jpeg(Image.new('RGB', (size, size), label_colour(label)))
  return _jpeg(draw_object_pair(label, size, rng))


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  archive.addfile(info, io.BytesIO(data))


def write_dataset(out: str | epath.Path, *, classes: int = 10,
                  images_per_class: int = 260, image_size: int = 96,
                  val_images: int = 50, label_in_pixels: bool = False,
                  seed: int = 0) -> epath.Path:
  """Writes the train (and optionally validation) archive into ``out``.

  Returns:
    ``out``, ready to be the TFDS ``manual_dir``.
  """
  if not label_in_pixels and not 1 <= classes <= MAX_DRAWN_CLASSES:
    raise ValueError(f'classes={classes}: the drawn dataset has 1 to '
                     f'{MAX_DRAWN_CLASSES} classes (label_in_pixels allows '
                     'up to 1000).')
  if not 1 <= val_images <= 50000:
    raise ValueError(f'val_images={val_images}: the TFDS builder needs a '
                     'validation archive of 1 to 50000 images.')
  out = epath.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  wnids = wordnet_ids()
  with (out / TRAIN_TAR).open('wb') as f, tarfile.open(fileobj=f,
                                                      mode='w') as train:
    for label in range(classes):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as class_tar:
        for n in range(images_per_class):
          _add(class_tar, f'{wnids[label]}_{n}.JPEG',
               _draw(label, image_size, rng, label_in_pixels))
      _add(train, f'{wnids[label]}.tar', inner.getvalue())
  index = {w: i for i, w in enumerate(wnids)}
  with (out / VAL_TAR).open('wb') as f, tarfile.open(fileobj=f,
                                                    mode='w') as val:
    for k, wnid in enumerate(validation_wnids()[:val_images]):
      _add(val, f'ILSVRC2012_val_{k + 1:08d}.JPEG',
           _draw(index[wnid], image_size, rng, label_in_pixels=True))
  return out


def write_image_folder(out: str | epath.Path, *, images_per_class: int = 120,
                       val_per_class: int = 40, image_size: int = 80,
                       seed: int = 1) -> epath.Path:
  """The shapes task: ``out/{train,val}/<shape>/<n>.jpg``, class = the
  target's shape, its place (above or below the disc) drawn at random."""
  out = epath.Path(out)
  rng = np.random.default_rng(seed)
  for split, count in (('train', images_per_class), ('val', val_per_class)):
    for shape_index, shape in enumerate(SHAPES):
      folder = out / split / shape
      folder.mkdir(parents=True, exist_ok=True)
      for n in range(count):
        label = 2 * shape_index + int(rng.integers(2))
        (folder / f'{n}.jpg').write_bytes(
            _jpeg(draw_object_pair(label, image_size, rng)))
  return out


def write_sample(path: str | epath.Path, *, label: int, image_size: int = 96,
                 seed: int = 0) -> epath.Path:
  """One drawn picture of class ``label`` as a PNG file, to show a model."""
  if not 0 <= label < MAX_DRAWN_CLASSES:
    raise ValueError(f'label={label}: the drawn classes are 0 to '
                     f'{MAX_DRAWN_CLASSES - 1}.')
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f:
    draw_object_pair(label, image_size, np.random.default_rng(seed)).save(
        f, format='PNG')
  return path


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if f.sample:
    path = write_sample(f.sample, label=f.label, image_size=f.image_size,
                        seed=f.seed)
    print(f'Wrote a picture of class {f.label} ({class_name(f.label)}) to '
          f'{path}')
    return
  if f.image_folder:
    out = write_image_folder(f.image_folder, image_size=f.image_size)
    print(f'Wrote the shapes task ({len(SHAPES)} classes) to {out}')
    return
  if not f.out:
    raise ValueError('Give --out=DIR (the dataset), --image_folder=DIR (the '
                     'shapes task) or --sample=FILE (one picture).')
  out = write_dataset(f.out, classes=f.classes,
                      images_per_class=f.images_per_class,
                      image_size=f.image_size, val_images=f.val_images,
                      label_in_pixels=f.label_in_pixels, seed=f.seed)
  print(f'Wrote {f.classes} x {f.images_per_class} images to '
        f'{out / TRAIN_TAR} and {f.val_images} to {out / VAL_TAR}')


if __name__ == '__main__':
  from absl import flags  # pylint: disable=g-import-not-at-top
  from glmix_jax import cli  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('out', None, 'Output directory (the TFDS manual_dir).')
  flags.DEFINE_string('sample', None, 'Instead: a PNG file for one picture '
                      'of class --label.')
  flags.DEFINE_string('image_folder', None, 'Instead: the shapes task (a '
                      'second task, for fine-tuning) as an image folder.')
  flags.DEFINE_integer('label', 0, 'The class of the --sample picture.')
  flags.DEFINE_integer('classes', 10, 'Number of classes.')
  flags.DEFINE_integer('images_per_class', 260, 'Training images per class.')
  flags.DEFINE_integer('image_size', 96, 'Side of the square images.')
  flags.DEFINE_integer('val_images', 50, 'Validation images (flat, '
                       'label-in-pixels; the TFDS builder needs some).')
  flags.DEFINE_bool('label_in_pixels', False, 'Flat images whose colour '
                    'encodes the label, for label-correctness tests.')
  flags.DEFINE_integer('seed', 0, 'Random seed.')
  cli.run(main)
