"""summer2winter from TFDS `cycle_gan/summer2winter_yosemite`: Yosemite summer (A) and winter (B), downloaded and prepared by TFDS on first use.

  python main.py --config=configs/summer2winter.py --workdir=runs/summer2winter
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "cycle_gan/summer2winter_yosemite"
  return config
