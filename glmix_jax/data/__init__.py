"""ImageNet input pipeline: host-side decoding/augmentation and on-device mixing."""
