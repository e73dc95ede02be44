"""Input data: TFDS sources, the training/eval pipeline, augmentation."""
