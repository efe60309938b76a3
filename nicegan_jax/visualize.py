"""Sample grids like the original's: rows real, CAM heatmap, reconstruction, translation, cycle.

Owns: the inference-mode forward that produces every row (`sample_rows`), the JET rendering of
heatmaps (`render_heatmap`; `overlay_attention` draws one over its image, as the demo shows it) and
the grid assembly (`direction_grid`). Pure functions; writing files is the loop's job.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nicegan_jax import input_pipeline
from nicegan_jax import models as models_lib
from nicegan_jax.models import Models


def jet(x: jax.Array) -> jax.Array:
  """The JET colour map on [0, 1] -> RGB in [0, 1] (blue, cyan, yellow, red)."""
  return jnp.stack([jnp.clip(1.5 - jnp.abs(4 * x - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)], axis=-1)


def scale_per_image(heatmap: jax.Array) -> jax.Array:
  """(B, h, w, 1) -> the same, each image's values mapped onto [0, 1] (min-max)."""
  lo = heatmap.min(axis=(1, 2, 3), keepdims=True)
  hi = heatmap.max(axis=(1, 2, 3), keepdims=True)
  return (heatmap - lo) / jnp.maximum(hi - lo, 1e-12)


def render_heatmap(heatmap: jax.Array, size: int) -> jax.Array:
  """(B, h, w, 1) channel sums -> (B, size, size, 3) in [-1, 1]: per-image min-max, bilinear, JET."""
  norm = scale_per_image(heatmap)
  norm = jax.image.resize(norm, (norm.shape[0], size, size, 1), "bilinear")
  return jet(norm[..., 0]) * 2.0 - 1.0


def sample_rows(models: Models, gen_params, disc_variables, real_A, real_B) -> dict[str, list]:
  """Inference-mode rows for both directions: {"A2B": [real, heatmap, recon, translation, cycle], ...}."""
  size = real_A.shape[1]
  out = {}
  for src, dst in (("A", "B"), ("B", "A")):
    real = real_A if src == "A" else real_B
    disc_src, disc_dst = getattr(models, f"dis{src}"), getattr(models, f"dis{dst}")
    gen_src, gen_dst = getattr(models, f"gen2{src}"), getattr(models, f"gen2{dst}")
    d_out = disc_src.apply(disc_variables[f"dis{src}"], real)  # inference mode; heatmap needed too
    recon = models_lib.decode(gen_src, gen_params[f"gen2{src}"], d_out.z)
    fake = models_lib.decode(gen_dst, gen_params[f"gen2{dst}"], d_out.z)
    z_fake = models_lib.encode(disc_dst, disc_variables[f"dis{dst}"], fake)
    cycle = models_lib.decode(gen_src, gen_params[f"gen2{src}"], z_fake)
    out[f"{src}2{dst}"] = [real, render_heatmap(d_out.heatmap, size), recon, fake, cycle]
  return out


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats (clipped there) -> uint8 [0, 255], rounded as every output of the library is
  (`input_pipeline.from_unit_range`)."""
  return input_pipeline.from_unit_range(np.clip(np.array(images, np.float32), -1.0, 1.0))


def overlay_attention(image: np.ndarray, attention: np.ndarray, opacity: float = 0.5) -> np.ndarray:
  """An (H, W, 3) uint8 image under its (H, W) attention map in [0, 1] drawn in JET at `opacity`."""
  colours = to_uint8(np.asarray(jet(jnp.asarray(attention, jnp.float32))) * 2.0 - 1.0).astype(np.float32)
  return np.rint((1.0 - opacity) * image.astype(np.float32) + opacity * colours).astype(np.uint8)


def direction_grid(rows: list) -> np.ndarray:
  """5 rows x N columns of (N, S, S, 3) images -> one (5*S, N*S, 3) uint8 image."""
  return np.concatenate([np.concatenate(list(to_uint8(r)), axis=1) for r in rows], axis=0)
