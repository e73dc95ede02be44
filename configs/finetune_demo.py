r"""Fine-tuning demo: the demo GLNet, trained on the mini-ImageNet, learns a
second synthetic task with other classes.

  python -m glmix_jax.data.synthetic --image_folder=/tmp/glmix_shapes
  python -m glmix_jax.data.prepare --dataset=glmix_shapes \
      --image_folder=/tmp/glmix_shapes --data_dir=/tmp/glmix_tfds
  python train.py --config=configs/finetune_demo.py --workdir=/tmp/glmix_ft
  python train.py --config=configs/finetune_demo.py --workdir=/tmp/glmix_ft0 \
      --config.init_from=   # the same steps from scratch

The task (``synthetic.write_image_folder``): the target's shape alone, 5
classes, 600 training and 200 validation images. The demo's model and light
augmentation (``configs/demo.py``), started from the demo run's weights
(``init_from``; run ``configs/demo.py`` first) with a new 5-way head, 60
steps of batch 64 at a tenth of the demo's learning rate.
"""

from configs import demo


def get_config():
  config = demo.get_config()
  del config.data['synthetic']  # a prepared image folder, not the demo set
  config.data.update(dataset='glmix_shapes', data_dir='/tmp/glmix_tfds',
                     num_classes=5, train_split='train')
  config.evals.val.split = 'validation'
  config.evals.fewshot.update(train_split='train', split='validation')
  config.update(init_from='/tmp/glmix_demo', total_steps=60, warmup_epochs=0,
                checkpoint_steps=60, log_steps=10)
  config.optimizer.lr = 2e-4
  return config
