"""A complete, tiny config for tests: 64x64, 8 channels, 1 residual block, a handful of steps."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "image_folder"
  config.model.img_size = 64
  config.model.ch = 8
  config.model.n_res = 1
  config.model.n_dis = 6
  config.train.num_steps = 4
  config.train.batch_size = 2
  config.train.log_every_steps = 2
  config.train.checkpoint_every_steps = 2
  config.train.sample_every_steps = 2
  config.train.sample_columns = 2
  config.mesh.data = 1  # one device, whatever the machine (tests force several CPU devices)
  return config
