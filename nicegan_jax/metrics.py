"""FID and KID between two sets of Inception features, as the official `metric/fid_kid.py` computes them.

Owns: `fid` (Frechet distance of Gaussians with unbiased covariances) and `kid` (unbiased MMD^2 with the cubic polynomial kernel, averaged
over subsets of min(1000, n_real, n_fake) drawn without replacement; seedable). Float64 numpy/scipy.
"""

from __future__ import annotations

import numpy as np


def _centred_rows_factor(features: np.ndarray) -> np.ndarray:
  """R with R^T R = X^T X for the centred features X (n x d): min(n, d) x d, from a QR of X."""
  centred = features - features.mean(0)
  return np.linalg.qr(centred, mode="r")


def trace_sqrt_covariance_product(features_1: np.ndarray, features_2: np.ndarray) -> float:
  """Tr((S1 S2)^(1/2)) for the unbiased covariances S1, S2 of two feature sets, without forming them.

  With X1, X2 the centred features, S1 S2 = X1^T (X1 X2^T X2) / ((n1 - 1)(n2 - 1)), whose nonzero
  eigenvalues are the squared singular values of X1 X2^T / sqrt((n1 - 1)(n2 - 1)); the trace of the
  square root is their sum (the nuclear norm). X1 X2^T has the singular values of R1 R2^T for the QR
  factors R of X1 and X2, at most min(n, d) on a side. The same value as the official script's
  `scipy.linalg.sqrtm` of S1 S2 (to ~1e-6 relative; sqrtm's own error at 2048-d), which needs no
  singular-matrix fallback when n < d makes the covariances rank-deficient, and costs milliseconds for a
  few hundred images where two 2048-d eigendecompositions cost seconds.
  """
  f1, f2 = np.asarray(features_1, np.float64), np.asarray(features_2, np.float64)
  r1, r2 = _centred_rows_factor(f1), _centred_rows_factor(f2)
  singular_values = np.linalg.svd(r1 @ r2.T, compute_uv=False)
  return float(singular_values.sum() / np.sqrt((len(f1) - 1) * (len(f2) - 1)))


def fid(features_1: np.ndarray, features_2: np.ndarray) -> float:
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), unbiased covariances."""
  f1, f2 = np.asarray(features_1, np.float64), np.asarray(features_2, np.float64)
  if len(f1) < 2 or len(f2) < 2:
    raise ValueError(f"FID needs at least 2 images per set; got {len(f1)} and {len(f2)}")
  diff = f1.mean(0) - f2.mean(0)
  trace_1, trace_2 = f1.var(0, ddof=1).sum(), f2.var(0, ddof=1).sum()  # Tr(S): the summed variances
  return float(diff @ diff + trace_1 + trace_2 - 2 * trace_sqrt_covariance_product(f1, f2))


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
