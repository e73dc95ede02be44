"""Throughput of the host-side augmentation, in images/s per CPU core.

Runs ``glmix_jax.data.augment.train_transform`` (full DeiT/GLNet recipe:
RandomResizedCrop 224 bicubic, flip, RandAugment rand-m9-mstd0.5-inc1,
normalise, RandomErasing 0.25) and ``eval_transform`` in one process on one
core, over procedurally generated ImageNet-sized JPEGs (500x375 and 375x500,
quality 90, with smooth shading, edges and sensor-like noise; about 90 kB
each, near ImageNet's ~110 kB average, so decoding costs about what it does on
photographs). The stages are timed with the augmentations added one by one,
to show where the time goes.

  PYTHONPATH=. python benchmarks/input_pipeline.py --json /tmp/pipeline.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import io
import json
import math
import os
import platform
import time
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from configs import common
from glmix_jax.data import augment


def make_jpegs(count: int, seed: int = 0) -> list[bytes]:
  """``count`` photo-like JPEGs, 500x375 or 375x500, quality 90."""
  rng = np.random.default_rng(seed)
  jpegs = []
  for i in range(count):
    width, height = (500, 375) if i % 4 else (375, 500)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # Low-frequency shading per channel, like lighting on a scene.
    image = np.zeros((height, width, 3), np.float32)
    for c in range(3):
      fx, fy = rng.uniform(0.002, 0.02, 2)
      phase = rng.uniform(0, 2 * np.pi)
      image[..., c] = 128 + 90 * np.sin(fx * xx + fy * yy + phase)
    img = Image.fromarray(image.clip(0, 255).astype(np.uint8))
    # Objects with hard edges.
    draw = ImageDraw.Draw(img)
    for _ in range(12):
      x0, y0 = rng.integers(0, width), rng.integers(0, height)
      x1, y1 = x0 + rng.integers(10, 200), y0 + rng.integers(10, 200)
      colour = tuple(int(v) for v in rng.integers(0, 256, 3))
      shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
      shape((x0, y0, x1, y1), fill=colour)
    # Texture and sensor noise.
    pixels = np.asarray(img, np.float32)
    pixels += rng.normal(0, 16, pixels.shape).astype(np.float32)
    img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    img.save(buffer, format='JPEG', quality=90)
    jpegs.append(buffer.getvalue())
  return jpegs


def time_pass(fn: Callable[[bytes, int], object], jpegs: list[bytes],
              seed: int) -> tuple[float, float]:
  """(CPU seconds, wall seconds) of one pass of ``fn`` over ``jpegs``."""
  cpu, wall = time.process_time(), time.perf_counter()
  for i, data in enumerate(jpegs):
    fn(data, seed + i)
  return time.process_time() - cpu, time.perf_counter() - wall


def stage_functions(cfg) -> dict[str, Callable[[bytes, int], object]]:
  """The train transform with augmentations added one by one, and eval."""

  def train(randaugment, random_erasing):
    stage_cfg = copy.deepcopy(cfg)
    stage_cfg.augmentation.randaugment = randaugment
    stage_cfg.augmentation.random_erasing = random_erasing
    return lambda data, seed: augment.train_transform(
        data, np.random.default_rng(seed), stage_cfg)

  aug = cfg.augmentation
  return {
      'decode only (full size)': lambda data, _: augment.decode_image(data),
      'crop + flip + normalise': train('', 0.0),
      '+ RandAugment': train(aug.randaugment, 0.0),
      '+ RandomErasing (full)': train(aug.randaugment, aug.random_erasing),
      'eval_transform': lambda data, _: augment.eval_transform(data, cfg),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--json', required=True, help='where to write results')
  parser.add_argument('--images', type=int, default=300)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--cpu', type=int, default=0,
                      help='the one core to pin this process to')
  args = parser.parse_args()
  # One core, so that "per core" holds even if a library spawned threads.
  os.sched_setaffinity(0, {args.cpu})

  cfg = common.imagenet_data()
  cfg.augmentation = common.deit_augmentation()
  jpegs = make_jpegs(args.images)
  stages = stage_functions(cfg)
  for fn in stages.values():
    fn(jpegs[0], 0)  # warm-up
  # Stages interleaved within each repeat and the best pass kept, so that
  # load from other processes on the shared machine hits them alike. CPU time
  # is this process's own: images per CPU-second is images/s per core.
  best = {name: (math.inf, math.inf) for name in stages}
  for r in range(args.repeats):
    for name, fn in stages.items():
      cpu, wall = time_pass(fn, jpegs, r * len(jpegs))
      best[name] = (min(best[name][0], cpu), min(best[name][1], wall))
  results = {name: dict(per_cpu_second=len(jpegs) / cpu,
                        per_wall_second=len(jpegs) / wall)
             for name, (cpu, wall) in best.items()}
  print(f'{len(jpegs)} JPEGs, mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f}'
        f' kB, one process pinned to CPU {args.cpu}, best of {args.repeats}')
  print(f'{"stage":<28} {"images/CPU-s":>13} {"ms/image":>9} '
        f'{"images/wall-s":>14}')
  for name, rates in results.items():
    print(f'{name:<28} {rates["per_cpu_second"]:>13.0f} '
          f'{1e3 / rates["per_cpu_second"]:>9.2f} '
          f'{rates["per_wall_second"]:>14.0f}')

  with open(args.json, 'w') as f:
    json.dump(dict(
        images_per_second_per_core=results,
        num_images=len(jpegs),
        pinned_cpu=args.cpu,
        repeats=args.repeats,
        mean_jpeg_bytes=float(np.mean([len(j) for j in jpegs])),
        randaugment=cfg.augmentation.randaugment,
        machine=dict(platform=platform.platform(), cpu_count=os.cpu_count(),
                     processor=platform.processor()),
        pillow=Image.__version__,
        numpy=np.__version__,
        date=datetime.date.today().isoformat(),
    ), f, indent=2)


if __name__ == '__main__':
  main()
