"""A complete, tiny config for tests: 64x64, 8 channels, 1 residual block, a handful of steps."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "image_folder"
  config.model.img_size = 64
  config.model.ch = 8
  config.model.n_res = 1
  config.model.n_dis = 6
  # XLA's convolutions compile about a third faster than the CPU paths that "auto" picks on CPUs, which
  # only pay off at real widths. The CPU paths keep their own tests: equality with XLA's convolution and
  # its gradients (test_convolutions.py) and training against PyTorch (test_torch_parity.py).
  config.model.conv_impl = "xla"
  # A constant learning rate: the compiled step then does not depend on train.num_steps, so runs of any
  # length share one program. The decaying schedule keeps its own tests: the numbers worked out in
  # test_train_state.py, training against PyTorch across the decay's start (test_torch_parity.py) and
  # resume under SIGKILL (benchmarks/crash_soak.py).
  config.optimizer.decay_flag = False
  config.train.num_steps = 4
  config.train.batch_size = 2
  config.train.log_every_steps = 2
  config.train.checkpoint_every_steps = 2
  config.train.sample_every_steps = 2
  config.train.sample_columns = 2
  config.mesh.data = 1  # one device, whatever the machine (tests force several CPU devices)
  return config
