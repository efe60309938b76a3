"""A PyTorch reference of the original NICE-GAN, written from the original's code, for parity tests.

Owns: the four networks with the original's module and parameter names (`Discriminator`,
`ResnetGenerator`, `ILN`, `adaILN`, `ResnetAdaILNBlock`), the two Adam optimisers with coupled weight
decay over chain(gen2B, gen2A) and chain(disA, disB), one training iteration exactly as the original's
`train()` runs it (`train_iteration`), and a checkpoint in the original's format (`checkpoint`).

torch is a test dependency only; tests that import this module skip when it is not installed.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
import torch.nn.functional as F

SN = nn.utils.spectral_norm


class Discriminator(nn.Module):
  """The discriminator: encoder (model + CAM) and three heads; n_layers = n_dis."""

  def __init__(self, input_nc=3, ndf=64, n_layers=7):
    super().__init__()
    model = [nn.ReflectionPad2d(1), SN(nn.Conv2d(input_nc, ndf, 4, 2, 0, bias=True)), nn.LeakyReLU(0.2, True),
             nn.ReflectionPad2d(1), SN(nn.Conv2d(ndf, ndf * 2, 4, 2, 0, bias=True)), nn.LeakyReLU(0.2, True)]
    mult = 2
    self.fc = SN(nn.Linear(ndf * mult * 2, 1, bias=False))
    self.conv1x1 = nn.Conv2d(ndf * mult * 2, ndf * mult, 1, 1, bias=True)
    self.leaky_relu = nn.LeakyReLU(0.2, True)
    self.lamda = nn.Parameter(torch.zeros(1))

    dis0_0 = []
    for i in range(2, n_layers - 4):
      mult = 2 ** (i - 1)
      dis0_0 += [nn.ReflectionPad2d(1), SN(nn.Conv2d(ndf * mult, ndf * mult * 2, 4, 2, 0, bias=True)),
                 nn.LeakyReLU(0.2, True)]
    mult = 2 ** (n_layers - 4 - 1)
    dis0_1 = [nn.ReflectionPad2d(1), SN(nn.Conv2d(ndf * mult, ndf * mult * 2, 4, 1, 0, bias=True)),
              nn.LeakyReLU(0.2, True)]
    mult = 2 ** (n_layers - 4)
    self.conv0 = SN(nn.Conv2d(ndf * mult, 1, 4, 1, 0, bias=False))

    dis1_0 = []
    for i in range(n_layers - 4, n_layers - 2):
      mult = 2 ** (i - 1)
      dis1_0 += [nn.ReflectionPad2d(1), SN(nn.Conv2d(ndf * mult, ndf * mult * 2, 4, 2, 0, bias=True)),
                 nn.LeakyReLU(0.2, True)]
    mult = 2 ** (n_layers - 2 - 1)
    dis1_1 = [nn.ReflectionPad2d(1), SN(nn.Conv2d(ndf * mult, ndf * mult * 2, 4, 1, 0, bias=True)),
              nn.LeakyReLU(0.2, True)]
    mult = 2 ** (n_layers - 2)
    self.conv1 = SN(nn.Conv2d(ndf * mult, 1, 4, 1, 0, bias=False))

    self.pad = nn.ReflectionPad2d(1)
    self.model = nn.Sequential(*model)
    self.Dis0_0 = nn.Sequential(*dis0_0)
    self.Dis0_1 = nn.Sequential(*dis0_1)
    self.Dis1_0 = nn.Sequential(*dis1_0)
    self.Dis1_1 = nn.Sequential(*dis1_1)

  def forward(self, x):
    x = self.model(x)
    x_0 = x
    gap = F.adaptive_avg_pool2d(x, 1)
    gmp = F.adaptive_max_pool2d(x, 1)
    x = torch.cat([x, x], 1)
    cam_logit = torch.cat([gap, gmp], 1)
    cam_logit = self.fc(cam_logit.view(cam_logit.shape[0], -1))
    weight = list(self.fc.parameters())[0]  # the raw weight_orig: the CAM weight quirk
    x = x * weight.unsqueeze(2).unsqueeze(3)
    x = self.conv1x1(x)
    x = self.lamda * x + x_0
    x = self.leaky_relu(x)
    heatmap = torch.sum(x, dim=1, keepdim=True)
    z = x
    x0 = self.Dis0_0(x)
    x1 = self.Dis1_0(x0)
    x0 = self.Dis0_1(x0)
    x1 = self.Dis1_1(x1)
    out0 = self.conv0(self.pad(x0))
    out1 = self.conv1(self.pad(x1))
    return out0, out1, cam_logit, heatmap, z


class ILN(nn.Module):
  def __init__(self, num_features, eps=1e-5):
    super().__init__()
    self.eps = eps
    self.rho = nn.Parameter(torch.Tensor(1, num_features, 2))
    self.gamma = nn.Parameter(torch.Tensor(1, num_features, 1, 1))
    self.beta = nn.Parameter(torch.Tensor(1, num_features, 1, 1))
    self.rho.data[:, :, 0].fill_(1.0)
    self.rho.data[:, :, 1].fill_(3.2)
    self.gamma.data.fill_(1.0)
    self.beta.data.fill_(0.0)

  def forward(self, x):
    return _mix(x, self.rho, self.eps) * self.gamma + self.beta


class adaILN(nn.Module):  # noqa: N801 - the original's name
  def __init__(self, num_features, eps=1e-5):
    super().__init__()
    self.eps = eps
    self.rho = nn.Parameter(torch.Tensor(1, num_features, 2))
    self.rho.data[:, :, 0].fill_(3.2)
    self.rho.data[:, :, 1].fill_(1.0)

  def forward(self, x, gamma, beta):
    return _mix(x, self.rho, self.eps) * gamma.unsqueeze(2).unsqueeze(3) + beta.unsqueeze(2).unsqueeze(3)


def _mix(x, rho_logits, eps):
  """softmax(rho)-weighted instance and layer normalisation, unbiased variances."""
  in_mean, in_var = torch.mean(x, dim=[2, 3], keepdim=True), torch.var(x, dim=[2, 3], keepdim=True)
  out_in = (x - in_mean) / torch.sqrt(in_var + eps)
  ln_mean, ln_var = torch.mean(x, dim=[1, 2, 3], keepdim=True), torch.var(x, dim=[1, 2, 3], keepdim=True)
  out_ln = (x - ln_mean) / torch.sqrt(ln_var + eps)
  rho = torch.softmax(rho_logits, 2)
  return rho[:, :, 0].unsqueeze(2).unsqueeze(3) * out_in + rho[:, :, 1].unsqueeze(2).unsqueeze(3) * out_ln


class ResnetAdaILNBlock(nn.Module):
  def __init__(self, dim, use_bias):
    super().__init__()
    self.pad1 = nn.ReflectionPad2d(1)
    self.conv1 = nn.Conv2d(dim, dim, 3, 1, 0, bias=use_bias)
    self.norm1 = adaILN(dim)
    self.relu1 = nn.ReLU(True)
    self.pad2 = nn.ReflectionPad2d(1)
    self.conv2 = nn.Conv2d(dim, dim, 3, 1, 0, bias=use_bias)
    self.norm2 = adaILN(dim)

  def forward(self, x, gamma, beta):
    out = self.relu1(self.norm1(self.conv1(self.pad1(x)), gamma, beta))
    out = self.norm2(self.conv2(self.pad2(out)), gamma, beta)
    return out + x


class ResnetGenerator(nn.Module):
  """The generator: the decoder from the 2*ngf-channel code to the image; light or full gamma/beta MLP."""

  def __init__(self, input_nc=3, output_nc=3, ngf=64, n_blocks=6, img_size=256, light=False):
    super().__init__()
    self.light, self.n_blocks = light, n_blocks
    n_downsampling = 2
    mult = 2 ** n_downsampling
    up0 = [nn.ReflectionPad2d(1), nn.Conv2d(ngf * mult // 2, ngf * mult, 3, 1, 0, bias=True), ILN(ngf * mult),
           nn.ReLU(True)]
    first = ngf * mult if light else img_size // mult * img_size // mult * ngf * mult
    fc = [nn.Linear(first, ngf * mult, bias=False), nn.ReLU(True),
          nn.Linear(ngf * mult, ngf * mult, bias=False), nn.ReLU(True)]
    self.gamma = nn.Linear(ngf * mult, ngf * mult, bias=False)
    self.beta = nn.Linear(ngf * mult, ngf * mult, bias=False)
    for i in range(n_blocks):
      setattr(self, f"UpBlock1_{i + 1}", ResnetAdaILNBlock(ngf * mult, use_bias=False))
    up2 = []
    for i in range(n_downsampling):
      mult = 2 ** (n_downsampling - i)
      up2 += [nn.ReflectionPad2d(1), nn.Conv2d(ngf * mult, ngf * mult // 2, 3, 1, 0, bias=False),
              ILN(ngf * mult // 2), nn.ReLU(True),
              nn.Conv2d(ngf * mult // 2, ngf * mult // 2 * 4, 1, 1, bias=True), nn.PixelShuffle(2),
              ILN(ngf * mult // 2), nn.ReLU(True)]
    up2 += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7, 1, 0, bias=False), nn.Tanh()]
    self.FC = nn.Sequential(*fc)
    self.UpBlock0 = nn.Sequential(*up0)
    self.UpBlock2 = nn.Sequential(*up2)

  def forward(self, z):
    x = self.UpBlock0(z)
    if self.light:
      x_ = F.adaptive_avg_pool2d(x, 1)
      x_ = self.FC(x_.view(x_.shape[0], -1))
    else:
      x_ = self.FC(x.view(x.shape[0], -1))
    gamma, beta = self.gamma(x_), self.beta(x_)
    for i in range(self.n_blocks):
      x = getattr(self, f"UpBlock1_{i + 1}")(x, gamma, beta)
    return self.UpBlock2(x)


class NICE:
  """The four networks, both optimisers and the training rule of the original."""

  def __init__(self, *, ch=64, n_res=6, n_dis=7, img_size=256, light=True, lr=1e-4, weight_decay=1e-4,
               iteration=300_000, decay_flag=True, adv_weight=1.0, cycle_weight=10.0, recon_weight=10.0):
    self.gen2B = ResnetGenerator(3, 3, ngf=ch, n_blocks=n_res, img_size=img_size, light=light)
    self.gen2A = ResnetGenerator(3, 3, ngf=ch, n_blocks=n_res, img_size=img_size, light=light)
    self.disA = Discriminator(3, ndf=ch, n_layers=n_dis)
    self.disB = Discriminator(3, ndf=ch, n_layers=n_dis)
    self.lr, self.iteration, self.decay_flag = lr, iteration, decay_flag
    self.adv_weight, self.cycle_weight, self.recon_weight = adv_weight, cycle_weight, recon_weight
    self.G_optim = torch.optim.Adam(itertools.chain(self.gen2B.parameters(), self.gen2A.parameters()),
                                    lr=lr, betas=(0.5, 0.999), weight_decay=weight_decay)
    self.D_optim = torch.optim.Adam(itertools.chain(self.disA.parameters(), self.disB.parameters()),
                                    lr=lr, betas=(0.5, 0.999), weight_decay=weight_decay)

  def networks(self):
    return {"gen2B": self.gen2B, "gen2A": self.gen2A, "disA": self.disA, "disB": self.disB}

  def set_mode(self, train: bool):
    for net in self.networks().values():
      net.train(train)

  def learning_rate(self, step: int) -> float:
    """The learning-rate schedule computed from the 1-based step (the original subtracts lr0 / (T // 2) per step)."""
    half = self.iteration // 2
    if not self.decay_flag or step <= half:
      return self.lr
    return self.lr * (self.iteration - step) / (self.iteration - half)

  def train_iteration(self, step: int, real_A, real_B) -> dict[str, float]:
    """One iteration of the original (D step with detached fakes, then G step with the updated D)."""
    self.set_mode(True)
    mse, l1 = nn.MSELoss(), nn.L1Loss()
    for optim in (self.G_optim, self.D_optim):
      optim.param_groups[0]["lr"] = self.learning_rate(step)

    self.D_optim.zero_grad()
    real_LA, real_GA, real_A_cam, _, real_A_z = self.disA(real_A)
    real_LB, real_GB, real_B_cam, _, real_B_z = self.disB(real_B)
    fake_A2B = self.gen2B(real_A_z).detach()
    fake_B2A = self.gen2A(real_B_z).detach()
    fake_LA, fake_GA, fake_A_cam, _, _ = self.disA(fake_B2A)
    fake_LB, fake_GB, fake_B_cam, _, _ = self.disB(fake_A2B)
    pair = lambda real, fake: mse(real, torch.ones_like(real)) + mse(fake, torch.zeros_like(fake))
    d_loss_A = self.adv_weight * (pair(real_GA, fake_GA) + pair(real_A_cam, fake_A_cam) + pair(real_LA, fake_LA))
    d_loss_B = self.adv_weight * (pair(real_GB, fake_GB) + pair(real_B_cam, fake_B_cam) + pair(real_LB, fake_LB))
    d_loss = d_loss_A + d_loss_B
    d_loss.backward()
    self.D_optim.step()

    self.G_optim.zero_grad()
    _, _, _, _, real_A_z = self.disA(real_A)
    _, _, _, _, real_B_z = self.disB(real_B)
    fake_A2B = self.gen2B(real_A_z)
    fake_B2A = self.gen2A(real_B_z)
    fake_LA, fake_GA, fake_A_cam, _, fake_A_z = self.disA(fake_B2A)
    fake_LB, fake_GB, fake_B_cam, _, fake_B_z = self.disB(fake_A2B)
    fake_B2A2B = self.gen2B(fake_A_z)
    fake_A2B2A = self.gen2A(fake_B_z)
    fake_A2A = self.gen2A(real_A_z)
    fake_B2B = self.gen2B(real_B_z)
    ones = lambda x: mse(x, torch.ones_like(x))
    g_loss_A = (self.adv_weight * (ones(fake_GA) + ones(fake_A_cam) + ones(fake_LA))
                + self.cycle_weight * l1(fake_A2B2A, real_A) + self.recon_weight * l1(fake_A2A, real_A))
    g_loss_B = (self.adv_weight * (ones(fake_GB) + ones(fake_B_cam) + ones(fake_LB))
                + self.cycle_weight * l1(fake_B2A2B, real_B) + self.recon_weight * l1(fake_B2B, real_B))
    g_loss = g_loss_A + g_loss_B
    g_loss.backward()
    self.G_optim.step()
    return {"D/loss": d_loss.item(), "G/loss": g_loss.item()}

  def checkpoint(self, step: int, *, profiler_entries: bool = False) -> dict:
    """The dict the original saves; optionally with thop's total_ops/total_params buffers."""
    params = {name: net.state_dict() for name, net in self.networks().items()}
    if profiler_entries:
      for name, net in self.networks().items():
        for module_name, _ in net.named_modules():
          prefix = f"{module_name}." if module_name else ""
          params[name][f"{prefix}total_ops"] = torch.zeros(1, dtype=torch.float64)
          params[name][f"{prefix}total_params"] = torch.zeros(1, dtype=torch.float64)
    params["D_optimizer"] = self.D_optim.state_dict()
    params["G_optimizer"] = self.G_optim.state_dict()
    params["start_iter"] = step
    return params
