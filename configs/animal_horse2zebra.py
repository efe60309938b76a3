"""The Animal-MNIST horse -> zebra benchmark (docs/results.md): the NICE-GAN recipe at 64x64.

Data: PyPI `animal-mnist==0.4` (horse = class 7, zebra = class 9; 800 train / 200 test each), 28x28
grey images upsampled bilinearly to 64x64 RGB by the project's own loader.

Model: 64x64 is the smallest size the original's discriminator accepts, and n_dis 6 its smallest working
depth there. ch 32 (half the original's 64) and 4 residual blocks (of 6) keep one step near 0.55 s on
two CPU cores, a quarter of the cost of ch 64, while the generator still has 16x the grey image's
degrees of freedom per pixel.

Two recipes, the same model and losses:

  * faithful (the default): the original's training recipe: batch 1, Adam(1e-4, 0.5, 0.999) with
    coupled weight decay 1e-4, LSGAN + 10 x cycle + 10 x reconstruction, linear decay after half, and
    the original's crop jitter (resize to size + 30/256 of it, random crop back; 8 pixels at 64x64).
  * tuned: the config values that take the benchmark over all three of its bars (docs/results.md: judge 91.5%,
    mask IoU 0.815, KIDx100 2.66 after 47 minutes of training on 2 CPU cores): no crop jitter
    (`data.resize_margin=0`: these miniatures are centred and scaled alike, and the jitter trains the
    generator on horses a size larger than the test horses), four images per step at lr 2e-4, and
    4500 steps (18000 images per domain; the lr still decays linearly over the second half).

  python -m benchmarks.horse2zebra_mini --workdir=runs/horse2zebra_mini
  python -m benchmarks.horse2zebra_mini --config=configs/animal_horse2zebra.py:tuned --workdir=runs/h2z_tuned
"""

from configs import demo

RECIPES = ("faithful", "tuned")


def get_config(recipe: str = "faithful"):
  if recipe not in RECIPES:
    raise ValueError(f"configs/animal_horse2zebra.py:{recipe}: unknown recipe; use one of "
                     f"{', '.join(RECIPES)} (e.g. configs/animal_horse2zebra.py:tuned)")
  config = demo.get_config()
  config.train.num_steps = 3000
  config.optimizer.decay_flag = True  # the original's schedule: linear decay to 0 over the second half
  config.train.checkpoint_every_steps = 500
  config.train.sample_every_steps = 500
  config.train.keep_checkpoints = 10
  if recipe == "tuned":
    config.data.resize_margin = 0
    config.train.batch_size = 4
    config.optimizer.lr = 2e-4
    config.train.num_steps = 4500
  return config
