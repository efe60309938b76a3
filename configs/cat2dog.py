"""cat2dog (the DRIT data, A = cat, B = dog): an image folder with trainA/ trainB/ testA/ testB/.

  python main.py --config=configs/cat2dog.py --workdir=runs/cat2dog --config.data.path=dataset/cat2dog
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "image_folder"
  config.data.path = "dataset/cat2dog"
  return config
