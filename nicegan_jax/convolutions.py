"""The convolution implementations the layers take: XLA's own, and the faster paths on XLA:CPU.

`layers.Conv` runs whatever function `(x, kernel, stride) -> y` it is given (as flax's `nn.Conv` takes
`conv_general_dilated`); `for_impl(config.model.conv_impl)` makes it: `conv_valid` ("xla", XLA's
convolution with VALID padding, the one GPUs and TPUs run) or `CpuConvolutions` ("cpu", the default
on CPUs). The CPU implementation picks per convolution, by size rules gathered in one `CpuPolicy`, a
convolution whose backward pass computes gradients
as one matmul per kernel tap (the kernel's always, the input's on small maps), which XLA:CPU runs
1.3-26x faster than its own gradient convolutions at batch 1; whose forward pass on small maps from 256+
channels is a sum of one matmul per tap too, and onto few outputs one matmul onto every tap's outputs
followed by shifted sums (both faster on XLA:CPU than its own convolution there); whose other stride-1
convolutions, forward and kernel gradient, run padded by one zero row whose output row is dropped
(`conv_padded`), since XLA:CPU runs unpadded stride-1 convolutions on a path about 3x slower; and whose
wide 3x3 stride-1 convolutions (the generators' residual blocks) run, forward and both gradients, as
Winograd's F(2x2, 3x3) (`conv_winograd`), which needs 2.25x fewer multiplies. `select` picks the path
of one convolution. Every path gives the same values as `conv_valid` up to float rounding; a benchmark
switches paths off with `CpuPolicy.without` to measure what each gains.

Layout is NHWC, kernels (kh, kw, in, out).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Callable

import jax
import jax.numpy as jnp

IMPLS = ("xla", "cpu")  # config.model.conv_impl ("auto": cpu on CPUs, xla on GPUs and TPUs)


@dataclasses.dataclass(frozen=True)
class CpuPolicy:
  """Where each of the CPU paths applies: size rules timed on XLA:CPU (the figures in the comments come
  from `benchmarks/speed.py` runs on a 2-core CPU; `benchmarks/speed_runs.md` holds them all). A
  benchmark passes another policy to measure a path against its absence (`without`)."""

  # Convs with fewer output features keep XLA's weight gradient: one matmul per tap of a 7x7 kernel with 3
  # outputs (the generator's last layer) is 6x slower than XLA's convolution on a CPU.
  matmul_weight_grad_min_features: int = 16
  # On small maps with many channels XLA:CPU's input-gradient convolution is slow too (250 ms for a 4x4
  # conv 512 -> 1024 on a 6x6 map, against 9 ms as 16 matmuls); on large maps its own is as fast or faster.
  matmul_input_grad_max_positions: int = 20 * 20
  # XLA:CPU's forward convolution from 256 or more input channels on maps of at most 32x32 outputs is
  # slower than a sum of one matmul per kernel tap (a 3x3 conv 256 -> 256 at 16x16: 4.6 ms against 3.4 ms
  # for one image, 28 ms against 22 ms for eight). With fewer inputs the whole train step got slower
  # although single convs from 32-128 channels were faster at batch 4-8; on larger maps XLA's is faster.
  taps_forward_min_in_features: int = 256
  taps_forward_max_positions: int = 32 * 32
  # XLA:CPU runs a stride-1 convolution without padding (VALID) on a far slower path than the same
  # convolution with any padding: a 3x3 conv 256 -> 256 on a 34x34 map at batch 8 takes 162 ms VALID and
  # 53 ms with one zero row padded below the input (whose extra output row is dropped), its kernel
  # gradient 174 ms against 83 ms; the generator's 7x7 conv 64 -> 3 at 64x64, 250 ms against 12 ms. So
  # stride-1 convs run that way (`conv_padded`), forward and kernel gradient, except on maps of fewer
  # output positions than this, where the tap matmuls stay faster (a 4x4 conv 1024 -> 2048 onto 3x3
  # outputs: 108 ms as taps, 139 ms padded).
  padded_min_positions: int = 8 * 8
  # XLA:CPU's forward convolution onto few outputs is slow, and slows far more than linearly with the
  # batch (the generator's 7x7 conv 64 -> 3 at 64x64: 34 ms for one image, 268 ms for eight; its 3x3 conv
  # 128 -> 64 on a 64x64 map: 138 ms for eight). One matmul onto all outputs x taps followed by shifted
  # sums (`conv_output_taps`) takes 1.3 ms, 9 ms and 63 ms there, so a conv forward runs that way when its
  # kernel has at most this many columns (outputs x kh x kw: 64 outputs of a 3x3 kernel; the 3x3 conv
  # 256 -> 128, 1152 columns, was no faster). Narrow convs (under matmul_weight_grad_min_features outputs)
  # keep XLA's gradients, which are fast for them (`conv_narrow`). From few input channels the matmul is
  # mostly writes (the discriminator's first 4x4 conv 3 -> 32 at batch 8: 24 ms against XLA's 1.5 ms),
  # hence a floor on the inputs.
  output_taps_max_columns: int = 576
  output_taps_min_in_features: int = 32
  # Where `conv_padded` applies too, output taps stay faster only while the matmul's result (batch x
  # output positions x columns) is small: the 7x7 conv 64 -> 3 at 64x64, batch 8 (4.8M entries): 7 ms
  # against 11 ms padded; at 128x128 (19M): 64 ms against 26 ms; the 3x3 conv 128 -> 64 on 64x64 outputs,
  # batch 8 (19M): 68 ms against 52 ms.
  output_taps_max_padded_alternative: int = 2 ** 23
  # Winograd's F(2x2, 3x3) (`conv_winograd`) takes 2.25x fewer multiplies for a 3x3 stride-1 conv, but its
  # 16 small matmuls and the tile transforms only pay off with enough channels and tiles (2x2 output
  # blocks over the batch). Whole train steps with it against without, same process (ch 64 unless said):
  # 64x64 batch 8 1.26x faster, 128x128 batch 8 1.17x, 128x128 batch 1 1.14x, ch 32 batch 4 1.09x; at
  # 64x64 batch 1 (64 tiles per residual conv) 0.99x, hence the tile floor. Convs to or from 64 channels
  # were slower this way (a 3x3 conv 128 -> 64 at 32x32, batch 8, forward and gradients: 43 ms as
  # Winograd, 21 ms otherwise).
  winograd_min_features: int = 128
  winograd_min_tiles: int = 256

  def without(self, *paths: str) -> "CpuPolicy":
    """This policy with the named paths (`CPU_PATHS`) never taken."""
    unknown = sorted(set(paths) - set(CPU_PATHS))
    if unknown:
      raise ValueError(f"unknown CPU path(s) {', '.join(unknown)}; use some of {', '.join(CPU_PATHS)}")
    changes = {}
    for path in paths:
      changes.update(CPU_PATHS[path])
    return dataclasses.replace(self, **changes)


NEVER = sys.maxsize
# Each CPU path, and the policy fields that switch it off (`CpuPolicy.without`).
CPU_PATHS = {
    "weight_grad_taps": {"matmul_weight_grad_min_features": NEVER},  # kernel gradients as tap matmuls
    "input_grad_taps": {"matmul_input_grad_max_positions": 0},  # input gradients as tap matmuls
    "forward_taps": {"taps_forward_min_in_features": NEVER},  # `conv_taps` forwards
    "padded": {"padded_min_positions": NEVER},  # `conv_padded`
    "output_taps": {"output_taps_max_columns": 0},  # `conv_output_taps` forwards (and `conv_narrow`)
    "winograd": {"winograd_min_tiles": NEVER},  # `conv_winograd`
}


def conv_valid(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """Unpadded NHWC x HWIO convolution."""
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_padded(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """`conv_valid` computed with `stride` zero rows padded below the input and the extra output row
  dropped: the same values, on XLA:CPU's much faster path for padded convolutions (the CPU
  implementation uses it at stride 1 only: CpuPolicy.padded_min_positions)."""
  out_h, _ = _conv_output_hw(x, kernel.shape[0], stride)
  y = jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((0, stride), (0, 0)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y[:, :out_h]


def _conv_output_hw(x: jax.Array, kernel_size: int, stride: int) -> tuple[int, int]:
  """Output height and width of an unpadded convolution of the NHWC batch `x`."""
  return (x.shape[1] - kernel_size) // stride + 1, (x.shape[2] - kernel_size) // stride + 1


def _tap_window(x: jax.Array, kh: int, kw: int, out_hw: tuple[int, int], stride: int) -> jax.Array:
  """The input pixels that kernel tap (kh, kw) meets: x[:, i*s + kh, j*s + kw, :] for each output (i, j)."""
  n, _, _, c = x.shape
  return jax.lax.slice(x, (0, kh, kw, 0),
                       (n, kh + (out_hw[0] - 1) * stride + 1, kw + (out_hw[1] - 1) * stride + 1, c),
                       (1, stride, stride, 1))


def conv_output_taps(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """`conv_valid` as one matmul onto every tap's outputs, then shifted sums:
  z[n, h, w, (kh, kw, o)] = sum over c of x[n, h, w, c] W[kh, kw, c, o], and
  y[n, i, j, o] = sum over kh, kw of z[n, i*s + kh, j*s + kw, (kh, kw, o)]. One wide matmul instead of a
  convolution: faster on XLA:CPU when the kernel has few columns (outputs x taps; OUTPUT_TAPS_*)."""
  k, _, features_in, features = kernel.shape
  n, h, w, _ = x.shape
  out_hw = _conv_output_hw(x, k, stride)
  per_tap = jnp.einsum("nhwi,iq->nhwq", x, kernel.transpose(2, 0, 1, 3).reshape(features_in, -1),
                       preferred_element_type=jnp.float32).reshape(n, h, w, k * k, features)
  y = None
  for kh in range(k):
    for kw in range(k):
      tap = _tap_window(per_tap[:, :, :, kh * k + kw], kh, kw, out_hw, stride)
      y = tap if y is None else y + tap
  return y.astype(jnp.result_type(x, kernel))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_narrow(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """A conv with few output features: `conv_output_taps` forward, XLA's gradients backward (fast for
  these convs; the transpose of the shifted sums is not)."""
  return conv_output_taps(x, kernel, stride)


def _conv_narrow_fwd(x, kernel, stride):
  return conv_narrow(x, kernel, stride), (x, kernel)


def _conv_narrow_bwd(stride, residuals, dy):
  x, kernel = residuals
  _, vjp = jax.vjp(lambda x_, w_: conv_valid(x_, w_, stride), x, kernel)
  return vjp(dy)


conv_narrow.defvjp(_conv_narrow_fwd, _conv_narrow_bwd)


def conv_taps(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """`conv_valid` as a sum of one matmul per kernel tap: y = sum over kh, kw of window(kh, kw) W[kh, kw]."""
  k = kernel.shape[0]
  out_hw = _conv_output_hw(x, k, stride)
  y = None
  for kh in range(k):
    for kw in range(k):
      tap = jnp.einsum("nhwi,io->nhwo", _tap_window(x, kh, kw, out_hw, stride), kernel[kh, kw],
                       preferred_element_type=jnp.float32)
      y = tap if y is None else y + tap
  return y.astype(jnp.result_type(x, kernel))


# Winograd F(2x2, 3x3) (Lavin & Gray, 2016): a 3x3 stride-1 conv computes each 2x2 block of outputs from
# the 4x4 input tile under it as A^T [(G g G^T) * (B^T d B)] A, so the matmuls shrink from 9 to 16/4 = 4
# multiplies per output and channel pair, and its gradients are the same transforms transposed. The 1-D
# transforms below (B^T, G, A^T and their transposes) act on lists of arrays, one per tile position.


def _winograd_input(d: list) -> list:
  """B^T d: four input-tile rows (or columns) -> four transformed ones."""
  return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def _winograd_input_transposed(v: list) -> list:
  """B v: the transpose of `_winograd_input`, for the input gradient."""
  return [v[0], v[1] - v[2] + v[3], v[1] + v[2] - v[0], -v[3]]


def _winograd_kernel(g: list) -> list:
  """G g: three kernel rows (or columns) -> four transformed ones."""
  return [g[0], 0.5 * (g[0] + g[1] + g[2]), 0.5 * (g[0] - g[1] + g[2]), g[2]]


def _winograd_kernel_transposed(u: list) -> list:
  """G^T u: the transpose of `_winograd_kernel`, for the kernel gradient."""
  return [u[0] + 0.5 * (u[1] + u[2]), 0.5 * (u[1] - u[2]), 0.5 * (u[1] + u[2]) + u[3]]


def _winograd_output(m: list) -> list:
  """A^T m: four transformed products -> the two outputs of a tile row (or column)."""
  return [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]


def _winograd_output_transposed(y: list) -> list:
  """A y: the transpose of `_winograd_output`, for the output gradient."""
  return [y[0], y[0] + y[1], y[0] - y[1], -y[1]]


def _along_both_axes(transform, grid: list) -> list:
  """`transform` applied along the rows, then along the columns, of a nested list grid[a][b]."""
  columns = [transform([row[b] for row in grid]) for b in range(len(grid[0]))]  # columns[b][i]
  return [transform([column[i] for column in columns]) for i in range(len(columns[0]))]


def _winograd_tiles(x: jax.Array, tiles_hw: tuple[int, int]) -> list:
  """d[a][b] (N, TH, TW, C): the input pixels x[:, 2i + a, 2j + b] of every 4x4 tile (i, j), a, b < 4."""
  n, h, w, c = x.shape
  blocks = x.reshape(n, h // 2, 2, w // 2, 2, c)
  th, tw = tiles_hw
  return [[blocks[:, a // 2:a // 2 + th, a % 2, b // 2:b // 2 + tw, b % 2] for b in range(4)] for a in range(4)]


def _stack_16(grid: list) -> jax.Array:
  """A 4x4 grid of (..., C) arrays (tiles (N, TH, TW, C) or kernels (C, O)) -> (16, rows, C), the batch of
  matrices the matmuls take."""
  return jnp.stack([t.reshape(-1, t.shape[-1]) for row in grid for t in row])


def _unstack_16(stacked: jax.Array, leading_shape: tuple[int, ...]) -> list:
  """The inverse of `_stack_16`: each matrix back to `leading_shape` + its last axis."""
  return [[stacked[4 * i + j].reshape(*leading_shape, -1) for j in range(4)] for i in range(4)]


def _winograd_operands(x: jax.Array, kernel: jax.Array):
  """(B^T d B for every tile, stacked (16, tiles, C); G g G^T, (16, C, O); the tiles' (N, TH, TW))."""
  n, h, w, _ = x.shape
  tiles = (n, (h - 2) // 2, (w - 2) // 2)
  inputs = _stack_16(_along_both_axes(_winograd_input, _winograd_tiles(x, tiles[1:])))
  kernels = _stack_16(_along_both_axes(_winograd_kernel, [[kernel[a, b] for b in range(3)] for a in range(3)]))
  return inputs, kernels, tiles


def _batched_matmul(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
  """16 matmuls at once: a[p] and b[p] contracted over axes `contract` (of the 3-D arrays)."""
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((0,), (0,))),
                             preferred_element_type=jnp.float32)


@jax.custom_vjp
def _conv_winograd_even(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv_winograd` for inputs whose output height and width are even."""
  inputs, kernels, tiles = _winograd_operands(x, kernel)
  products = _unstack_16(_batched_matmul(inputs, kernels, (2, 1)), tiles)
  y = _along_both_axes(_winograd_output, products)  # y[a][b]: output (2i + a, 2j + b) of tile (i, j)
  blocks = jnp.stack([jnp.stack(row, axis=3) for row in y], axis=2)  # (N, TH, 2, TW, 2, O)
  n, th, tw = tiles
  return blocks.reshape(n, 2 * th, 2 * tw, kernel.shape[3]).astype(x.dtype)


def _conv_winograd_fwd(x, kernel):
  return _conv_winograd_even(x, kernel), (x, kernel)


def _conv_winograd_bwd(residuals, dy):
  """Both gradients in the transformed domain: the output gradient's transform A dy A^T meets the saved
  inputs' (kernel gradient, then G^T . G) and the kernels' (input gradient, then B . B^T and each tile
  added back where it was read). The transforms are recomputed, not saved."""
  x, kernel = residuals
  inputs, kernels, tiles = _winograd_operands(x, kernel)
  dy_blocks = dy.reshape(tiles[0], tiles[1], 2, tiles[2], 2, dy.shape[3])
  dproducts = _stack_16(_along_both_axes(_winograd_output_transposed,
                                         [[dy_blocks[:, :, a, :, b] for b in range(2)] for a in range(2)]))
  dkernels = _batched_matmul(inputs, dproducts, (1, 1))  # (16, C, O)
  dkernel = _along_both_axes(_winograd_kernel_transposed, _unstack_16(dkernels, dkernels.shape[1:2]))
  dkernel = jnp.stack([jnp.stack(row) for row in dkernel]).astype(kernel.dtype)
  dtiles = _along_both_axes(_winograd_input_transposed,
                            _unstack_16(_batched_matmul(dproducts, kernels, (2, 2)), tiles))
  # Tile (i, j) read x[2i + a, 2j + b]: its gradient goes back to block (i + a // 2, j + b // 2), offset
  # (a % 2, b % 2) within the block; four tile positions share each offset.
  offsets = []  # offsets[pa][pb]: (N, TH + 1, TW + 1, C), the gradient at x[:, 2r + pa, 2s + pb]
  for pa in range(2):
    row = []
    for pb in range(2):
      row.append(sum(jnp.pad(dtiles[2 * oa + pa][2 * ob + pb], ((0, 0), (oa, 1 - oa), (ob, 1 - ob), (0, 0)))
                     for oa in range(2) for ob in range(2)))
    offsets.append(jnp.stack(row, axis=3))
  dx = jnp.stack(offsets, axis=2).reshape(x.shape).astype(x.dtype)
  return dx, dkernel


_conv_winograd_even.defvjp(_conv_winograd_fwd, _conv_winograd_bwd)


def conv_winograd(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv_valid` of a 3x3 kernel at stride 1 by Winograd's F(2x2, 3x3), gradients likewise: 2.25x fewer
  multiplies than the direct convolution, the same values up to float rounding. An odd output height or
  width gets one zero row (column) of input below (right), whose output is dropped."""
  if kernel.shape[:2] != (3, 3):
    raise ValueError(f"conv_winograd takes 3x3 kernels; got {kernel.shape[:2]}")
  out_h, out_w = x.shape[1] - 2, x.shape[2] - 2
  x = jnp.pad(x, ((0, 0), (0, out_h % 2), (0, out_w % 2), (0, 0)))
  return _conv_winograd_even(x, kernel)[:, :out_h, :out_w]


def _uses_padded(x: jax.Array, kernel: jax.Array, stride: int, policy: CpuPolicy) -> bool:
  """Whether this conv and its kernel gradient run as `conv_padded`."""
  out_h, out_w = _conv_output_hw(x, kernel.shape[0], stride)
  return stride == 1 and kernel.shape[0] > 1 and out_h * out_w >= policy.padded_min_positions


def _uses_winograd(x: jax.Array, kernel: jax.Array, stride: int, policy: CpuPolicy) -> bool:
  """Whether this conv, forward and gradients, runs as `conv_winograd`."""
  k, kw, features_in, features = kernel.shape
  out_h, out_w = _conv_output_hw(x, k, stride)
  tiles = x.shape[0] * ((out_h + 1) // 2) * ((out_w + 1) // 2)
  return (stride == 1 and (k, kw) == (3, 3) and x.dtype == jnp.float32 and kernel.dtype == jnp.float32
          and min(features_in, features) >= policy.winograd_min_features and tiles >= policy.winograd_min_tiles)


def _uses_taps_forward(x: jax.Array, kernel: jax.Array, stride: int, policy: CpuPolicy) -> bool:
  """Whether this conv's forward runs as `conv_taps` (see CpuPolicy.taps_forward_*)."""
  out_h, out_w = _conv_output_hw(x, kernel.shape[0], stride)
  return (kernel.shape[2] >= policy.taps_forward_min_in_features
          and out_h * out_w <= policy.taps_forward_max_positions and not _uses_padded(x, kernel, stride, policy))


def _uses_output_taps_forward(x: jax.Array, kernel: jax.Array, stride: int, policy: CpuPolicy) -> bool:
  """Whether this conv's forward runs as `conv_output_taps` (see CpuPolicy.output_taps_*)."""
  k, _, features_in, features = kernel.shape
  if not (k > 1 and features_in >= policy.output_taps_min_in_features
          and features * k * k <= policy.output_taps_max_columns):
    return False
  out_h, out_w = _conv_output_hw(x, k, stride)
  return (not _uses_padded(x, kernel, stride, policy)
          or x.shape[0] * out_h * out_w * features * k * k <= policy.output_taps_max_padded_alternative)


def conv_forward(x: jax.Array, kernel: jax.Array, stride: int, policy: CpuPolicy) -> jax.Array:
  """The CPU forward convolution: `conv_output_taps`, `conv_taps` or `conv_padded` where one is faster on
  XLA:CPU, else XLA's."""
  if _uses_output_taps_forward(x, kernel, stride, policy):
    return conv_output_taps(x, kernel, stride)
  if _uses_taps_forward(x, kernel, stride, policy):
    return conv_taps(x, kernel, stride)
  if _uses_padded(x, kernel, stride, policy):
    return conv_padded(x, kernel, stride)
  return conv_valid(x, kernel, stride)


def conv_weight_grad(x: jax.Array, dy: jax.Array, kernel_size: int, stride: int) -> jax.Array:
  """The gradient of sum(conv_valid(x, W) * dy) w.r.t. W (kh, kw, in, out), one matmul per tap:
  dW[kh, kw] = sum over n, i, j of x[n, i*s + kh, j*s + kw, :]^T dy[n, i, j, :]."""
  taps = []
  for kh in range(kernel_size):
    for kw in range(kernel_size):
      window = _tap_window(x, kh, kw, dy.shape[1:3], stride)
      taps.append(jnp.einsum("nhwi,nhwo->io", window, dy, preferred_element_type=jnp.float32))
  return jnp.stack(taps).reshape(kernel_size, kernel_size, x.shape[3], dy.shape[3])


def conv_input_grad(dy: jax.Array, kernel: jax.Array, stride: int, input_hw: tuple[int, int]) -> jax.Array:
  """The gradient of sum(conv_valid(x, W) * dy) w.r.t. x, one matmul per tap: dy[n, i, j] W[kh, kw]^T
  added at x[n, i*s + kh, j*s + kw] (placed with lax.pad: offset kh, stride s)."""
  k = kernel.shape[0]
  _, out_h, out_w, _ = dy.shape
  zero = jnp.zeros((), jnp.float32)
  dx = None
  for kh in range(k):
    for kw in range(k):
      tap = jnp.einsum("nhwo,io->nhwi", dy, kernel[kh, kw], preferred_element_type=jnp.float32)
      placed = jax.lax.pad(tap, zero, [(0, 0, 0),
                                       (kh, input_hw[0] - kh - (out_h - 1) * stride - 1, stride - 1),
                                       (kw, input_hw[1] - kw - (out_w - 1) * stride - 1, stride - 1),
                                       (0, 0, 0)])
      dx = placed if dx is None else dx + placed
  return dx.astype(dy.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_matmul_weight_grad(x: jax.Array, kernel: jax.Array, stride: int, policy: CpuPolicy) -> jax.Array:
  """`conv_forward` whose backward pass computes the kernel's gradient with `conv_weight_grad`, or as
  XLA's gradient of `conv_padded` where that conv applies, and the input's with `conv_input_grad` on
  small maps."""
  return conv_forward(x, kernel, stride, policy)


def _conv_matmul_fwd(x, kernel, stride, policy):
  return conv_forward(x, kernel, stride, policy), (x, kernel)


def _conv_matmul_bwd(stride, policy, residuals, dy):
  x, kernel = residuals
  if _uses_padded(x, kernel, stride, policy):
    _, kernel_vjp = jax.vjp(lambda w_: conv_padded(x, w_, stride), kernel)
    dkernel = kernel_vjp(dy)[0]
  else:
    dkernel = conv_weight_grad(x, dy, kernel.shape[0], stride).astype(kernel.dtype)
  if x.shape[1] * x.shape[2] <= policy.matmul_input_grad_max_positions:
    return conv_input_grad(dy, kernel, stride, x.shape[1:3]), dkernel
  _, input_vjp = jax.vjp(lambda x_: conv_valid(x_, kernel, stride), x)
  return input_vjp(dy)[0], dkernel


conv_matmul_weight_grad.defvjp(_conv_matmul_fwd, _conv_matmul_bwd)


def select(x: jax.Array, kernel: jax.Array, stride: int, policy: CpuPolicy) -> Callable:
  """The CPU path `(x, kernel, stride) -> y` of one convolution of these shapes."""
  if _uses_winograd(x, kernel, stride, policy):
    return lambda x, kernel, stride: conv_winograd(x, kernel)
  if kernel.shape[-1] >= policy.matmul_weight_grad_min_features:
    return lambda x, kernel, stride: conv_matmul_weight_grad(x, kernel, stride, policy)
  if _uses_output_taps_forward(x, kernel, stride, policy):
    return conv_narrow
  if _uses_padded(x, kernel, stride, policy):
    return conv_padded  # with XLA's gradients of the padded conv
  return conv_valid


@dataclasses.dataclass(frozen=True)
class CpuConvolutions:
  """The CPU implementation: each convolution by the fastest path its shapes take under `policy`
  (`select`), every path equal to `conv_valid` up to float rounding. Hashable, so modules holding it
  stay static arguments of jit."""
  policy: CpuPolicy = CpuPolicy()

  def __call__(self, x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    return select(x, kernel, stride, self.policy)(x, kernel, stride)


def resolve(conv_impl: str, backend: str | None = None) -> str:
  """`config.model.conv_impl` -> one of IMPLS: "auto" is "cpu" on CPUs and "xla" on GPUs and TPUs; any
  other value is refused by name."""
  if conv_impl == "auto":
    return "cpu" if (backend or jax.default_backend()) == "cpu" else "xla"
  if conv_impl not in IMPLS:
    raise ValueError(f"conv_impl must be one of auto, {', '.join(IMPLS)}; got {conv_impl!r}")
  return conv_impl


def for_impl(conv_impl: str, policy: CpuPolicy | None = None) -> Callable:
  """The convolution function `(x, kernel, stride) -> y` that the layers run for `conv_impl`."""
  if resolve(conv_impl) == "xla":
    return conv_valid
  return CpuConvolutions(policy or CpuPolicy())
