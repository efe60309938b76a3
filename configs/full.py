"""The full (non-light) variant: the gamma/beta MLP sees all features (268M-weight first layer).

The original's CLI default, never used for the paper's numbers. Pick the data as in the other configs:

  python main.py --config=configs/full.py --workdir=runs/s2a_full --config.data.path=dataset/selfie2anime
"""

from configs import selfie2anime


def get_config():
  config = selfie2anime.get_config()
  config.model.light = False
  return config
