"""horse2zebra from TFDS `cycle_gan/horse2zebra`: horse (A) and zebra (B), downloaded and prepared by TFDS on first use.

  python main.py --config=configs/horse2zebra.py --workdir=runs/horse2zebra
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "cycle_gan/horse2zebra"
  return config
