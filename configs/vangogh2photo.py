"""vangogh2photo from TFDS `cycle_gan/vangogh2photo`: Van Gogh paintings (A) and photos (B), downloaded and prepared by TFDS on first use.

  python main.py --config=configs/vangogh2photo.py --workdir=runs/vangogh2photo
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "cycle_gan/vangogh2photo"
  return config
