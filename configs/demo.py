"""A small real job for a 2-core CPU: Animal-MNIST horse -> zebra at 64x64 (data from PyPI).

The NICE-GAN recipe at 64x64: the original discriminator's smallest working depth there is n_dis 6;
ch 32 and 4 residual blocks keep a step well under a second on 2 CPU cores. The resize margin is
scaled with the image (30/256 of 64 ~ 8) so the random crop keeps the original's relative jitter.

  python main.py --config=configs/demo.py --workdir=runs/demo
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "animal_mnist/horse2zebra"
  config.data.resize_margin = 8
  config.model.img_size = 64
  config.model.ch = 32
  config.model.n_res = 4
  config.model.n_dis = 6
  config.train.num_steps = 1000
  config.train.batch_size = 1
  config.mesh.data = 1  # batch 1 runs on one device, whatever the machine has
  config.optimizer.decay_flag = False
  config.train.log_every_steps = 50
  config.train.checkpoint_every_steps = 500
  config.train.sample_every_steps = 250
  return config
