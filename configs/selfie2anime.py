"""selfie2anime (the U-GAT-IT data): an image folder with trainA/ (selfies) trainB/ (anime) testA/ testB/.

  python main.py --config=configs/selfie2anime.py --workdir=runs/selfie2anime \
      --config.data.path=dataset/selfie2anime
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "image_folder"
  config.data.path = "dataset/selfie2anime"
  return config
