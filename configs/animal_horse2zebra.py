"""The Animal-MNIST horse -> zebra benchmark (`spec/benchmarks.md`): the NICE-GAN recipe at 64x64.

Data: PyPI `animal-mnist==0.4` (horse = class 7, zebra = class 9; 800 train / 200 test each), 28x28
grey images upsampled bilinearly to 64x64 RGB by the project's own loader.

Model: 64x64 is the smallest size the original's discriminator accepts, and n_dis 6 its smallest working
depth there. ch 32 (half the original's 64) and 4 residual blocks (of 6) keep one step near 0.55 s on
two CPU cores, a quarter of the cost of ch 64, while the generator still has 16x the grey image's
degrees of freedom per pixel. Everything else is the original's recipe: batch 1, Adam(1e-4, 0.5, 0.999)
with coupled weight decay 1e-4, LSGAN + 10 x cycle + 10 x reconstruction, linear decay after half.

  python -m benchmarks.horse2zebra_mini --workdir=runs/horse2zebra_mini
"""

from configs import demo


def get_config():
  config = demo.get_config()
  config.train.num_steps = 3000
  config.optimizer.decay_flag = True  # the original's schedule: linear decay to 0 over the second half
  config.train.checkpoint_every_steps = 500
  config.train.sample_every_steps = 500
  config.train.keep_checkpoints = 10
  return config
