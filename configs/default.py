"""Every hyper-parameter of the original NICE-GAN (light variant, 256x256), grouped.

Dataset and variant configs import this and override a few fields. Command-line overrides:
`--config.train.num_steps=1000`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.data = ml_collections.ConfigDict()
  config.data.dataset = "image_folder"  # image_folder | cycle_gan/<name> | animal_mnist/<a>2<b>
  config.data.path = ""  # image_folder: the folder with trainA/ trainB/ testA/ testB/
  config.data.data_dir = ""  # where prepared datasets are cached ("" = ~/.cache/nicegan_jax/datasets)
  config.data.resize_margin = 30  # train transform: resize to img_size + margin, then random crop
  config.data.flip = True  # train transform: random horizontal flip (p = 0.5)
  config.data.skip_bad_images = False  # True: skip (and count) unreadable images instead of failing

  config.model = ml_collections.ConfigDict()
  config.model.img_size = 256  # square training size (multiple of 4)
  config.model.ch = 64  # base channels of discriminator and generator (`--ch`)
  config.model.n_res = 6  # AdaILN residual blocks in each generator (`--n_res`)
  config.model.n_dis = 7  # discriminator depth (`--n_dis`); >= 6, and 7 needs img_size >= 128
  config.model.light = True  # light: the gamma/beta MLP sees pooled features (the paper's numbers)
  config.model.dtype = "float32"  # compute dtype of convs and dense layers (params stay float32)
  config.model.remat = False  # recompute the generators' residual blocks in the backward pass
  config.model.conv_impl = "auto"  # auto | xla | cpu: how convolutions are computed (auto: cpu on CPUs)

  config.loss = ml_collections.ConfigDict()
  config.loss.adv_weight = 1.0  # LSGAN terms (3 heads per domain)
  config.loss.cycle_weight = 10.0  # L1(A -> B -> A, A)
  config.loss.recon_weight = 10.0  # L1(A -> A through disA's encoder and gen2A, A)

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.lr = 1e-4  # G and D (D times disc_lr_scale)
  config.optimizer.disc_lr_scale = 1.0  # D's lr = lr * this (1: the original; > 1: a faster D, TTUR)
  config.optimizer.b1 = 0.5
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 1e-4  # coupled L2 (added to the gradient), as torch Adam
  config.optimizer.decay_flag = True  # linear decay to 0 after decay_start_step
  config.optimizer.decay_start_step = -1  # -1: num_steps // 2, as the original

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 300_000  # the original's default; the paper stopped at 100K
  config.train.batch_size = 1  # global batch (per domain); the original used 1
  config.train.seed = 0
  config.train.log_every_steps = 100  # scalars to TensorBoard and the console
  config.train.checkpoint_every_steps = 1000  # the original saved `_params_latest.pt` every 1000
  config.train.keep_checkpoints = 3  # how many recent checkpoints to keep
  config.train.sample_every_steps = 1000  # sample grids (PNG + TensorBoard)
  config.train.sample_columns = 4  # grid columns per split (train and test)
  config.train.eval_every_steps = 0  # FID/KID during training (0 = off)
  config.train.steps_per_dispatch = 1  # >1: that many steps in one jitted lax.scan (hides host overhead)
  config.train.prefetch = 2  # input batches put on the device ahead of the step (0 = off)
  config.train.profile_steps = 0  # >0: trace that many steps with jax.profiler into the workdir (TensorBoard)

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # data-parallel replicas (-1 = all devices / mesh.model)
  config.mesh.model = 1  # devices that split one replica's large tensors (the full model's FC_0)
  config.mesh.shard_min_size = 1 << 20  # tensors with fewer elements stay whole on every device

  return config
