"""Image-folder datasets (TFDS builder), Animal-MNIST split, transforms and the batch stream."""

import pathlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_DATA
from nicegan_jax import datasets, input_pipeline


def data_config(path, cache, **overrides):
  config = ml_collections.ConfigDict({"dataset": "image_folder", "path": str(path),
                                      "data_dir": str(cache), "resize_margin": 30, "flip": True,
                                      "skip_bad_images": False})
  config.update(overrides)
  return config


def make_folder(root: pathlib.Path, corrupt: bool = False) -> pathlib.Path:
  """trainA with nested folders, mixed formats, case and colour modes; optionally one corrupt file."""
  rng = np.random.default_rng(0)
  rgb = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  (root / "trainA" / "sub" / "deeper").mkdir(parents=True)
  Image.fromarray(rgb(20, 30)).save(root / "trainA" / "a.JPG", format="JPEG")
  Image.fromarray(rgb(21, 17)).convert("L").save(root / "trainA" / "sub" / "gray.png")
  Image.fromarray(rgb(16, 16)).convert("RGBA").save(root / "trainA" / "sub" / "deeper" / "rgba.PNG")
  Image.fromarray(rgb(18, 18)).convert("P").save(root / "trainA" / "palette.bmp")
  Image.fromarray(rgb(19, 23)).save(root / "trainA" / "w.webp")
  Image.fromarray(rgb(12, 12)).save(root / "trainA" / "t.TIF")
  (root / "trainA" / "notes.txt").write_text("not an image")
  for split in ("trainB", "testA", "testB"):
    (root / split).mkdir()
    Image.fromarray(rgb(24, 24)).save(root / split / "x.ppm")
  if corrupt:
    (root / "trainB" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
  return root


def test_image_folder_reads_nested_mixed_formats_as_rgb(tmp_path):
  root = make_folder(tmp_path / "data")
  sources = datasets.load_domains(data_config(root, tmp_path / "cache"), img_size=64)
  assert {k: len(v) for k, v in sources.items()} == {"trainA": 6, "trainB": 1, "testA": 1, "testB": 1}
  shapes = sorted(sources["trainA"][i].shape for i in range(6))
  assert shapes == sorted([(20, 30, 3), (21, 17, 3), (16, 16, 3), (18, 18, 3), (19, 23, 3), (12, 12, 3)])
  for i in range(6):
    assert sources["trainA"][i].dtype == np.uint8
  gray = [sources["trainA"][i] for i in range(6) if sources["trainA"][i].shape == (21, 17, 3)][0]
  assert np.array_equal(gray[..., 0], gray[..., 1])  # grayscale replicated to 3 channels


@pytest.mark.parametrize("mode", ["1", "L", "P", "LA", "PA", "RGBA", "CMYK", "YCbCr", "I;16", "I;16B"])
def test_every_image_mode_decodes_to_its_rgb(mode):
  rng = np.random.default_rng(5)
  rgb = Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8))
  if mode.startswith("I;16"):
    grey16 = rng.integers(0, 65536, (9, 7)).astype(">u2" if mode == "I;16B" else "<u2")
    image = Image.frombytes(mode, (7, 9), grey16.tobytes())
    expected = np.repeat(((grey16.astype(np.uint32) + 128) // 257).astype(np.uint8)[..., None], 3, -1)
  else:
    image = rgb.convert(mode)
    expected = np.asarray(image.convert("RGB"))
  out = datasets.to_rgb(image)
  assert out.dtype == np.uint8 and out.shape == (9, 7, 3)
  np.testing.assert_array_equal(out, expected)
  if mode.startswith("I;16"):
    assert (out == 255).mean() < 0.05  # convert("RGB") would clip nearly every pixel to white


@pytest.mark.parametrize("mode,name", [("I", "32-bit integer"), ("F", "32-bit floating-point")])
def test_modes_without_a_range_are_refused_by_name(tmp_path, mode, name):
  Image.fromarray(np.zeros((8, 8), np.int32 if mode == "I" else np.float32)).save(tmp_path / "x.tif")
  with pytest.raises(datasets.DataError, match=f"cannot read image .*x.tif: a {name} image \\(PIL mode {mode}\\)"):
    datasets.read_rgb(tmp_path / "x.tif")


def test_a_sixteen_bit_training_image_is_not_white(tmp_path):
  root = make_folder(tmp_path / "data")
  ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)
  Image.fromarray(ramp).save(root / "trainB" / "deep.png")
  sources = datasets.load_domains(data_config(root, tmp_path / "cache"), img_size=64)
  deep = [sources["trainB"][i] for i in range(len(sources["trainB"])) if sources["trainB"][i].shape == (32, 32, 3)]
  np.testing.assert_array_equal(deep[0][..., 0], ((ramp.astype(np.uint32) + 128) // 257).astype(np.uint8))


def test_corrupt_image_is_named_or_skipped(tmp_path):
  root = make_folder(tmp_path / "data", corrupt=True)
  with pytest.raises(datasets.DataError, match="broken.jpg"):
    datasets.load_domains(data_config(root, tmp_path / "cache"), img_size=64)
  sources = datasets.load_domains(data_config(root, tmp_path / "cache", skip_bad_images=True), 64)
  assert len(sources["trainB"]) == 1


def test_empty_or_missing_domain_is_named(tmp_path):
  root = make_folder(tmp_path / "data")
  for f in (root / "testB").iterdir():
    f.unlink()
  with pytest.raises(datasets.DataError, match="no images under .*testB"):
    datasets.load_domains(data_config(root, tmp_path / "cache"), img_size=64)
  (root / "testB").rmdir()
  with pytest.raises(datasets.DataError, match="missing folder .*testB"):
    datasets.load_domains(data_config(root, tmp_path / "cache"), img_size=64)


@pytest.mark.skipif(not (SHARED_DATA / "cat2dog_sample").is_dir(),
                    reason="../shared/data/cat2dog_sample is not present")
def test_image_folder_on_the_real_cat2dog_sample(tmp_path):
  root = tmp_path / "cat2dog"
  root.mkdir()
  for split, source in (("trainA", "testA"), ("trainB", "testB"), ("testA", "testA"), ("testB", "testB")):
    (root / split).symlink_to(SHARED_DATA / "cat2dog_sample" / source)
  sources = datasets.load_domains(data_config(root, tmp_path / "cache"), img_size=64)
  assert len(sources["trainA"]) == 100 and len(sources["testB"]) == 100
  names = [sources["testA"].filename(i) for i in range(100)]
  files = sorted((SHARED_DATA / "cat2dog_sample" / "testA").iterdir())
  assert sorted(names) == sorted(f"testA/{f.name}" for f in files)
  index = names.index(f"testA/{files[0].name}")
  with Image.open(files[0]) as image:
    np.testing.assert_array_equal(sources["testA"][index], np.asarray(image.convert("RGB")))
  assert sources["testA"][index].shape == (218, 178, 3)
  batch = next(input_pipeline.train_batches(sources, data_config(root, tmp_path), img_size=64,
                                            global_batch_size=3, seed=0))
  assert batch["A"].shape == (3, 64, 64, 3) and batch["B"].shape == (3, 64, 64, 3)


def test_train_transform_shapes_range_flip_and_crop():
  image = np.zeros((40, 50, 3), np.uint8)
  image[:, :25] = 255  # left half white
  flips, tops = 0, set()
  for seed in range(200):
    rng = np.random.default_rng(seed)
    out = input_pipeline.train_transform(image, rng, img_size=32, margin=8, flip=True)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    flips += out[16, 0, 0] < out[16, -1, 0]  # white on the right: flipped
    rng = np.random.default_rng(seed)
    rng.random()
    tops.add(int(rng.integers(0, 9, size=2)[0]))
  assert 70 < flips < 130  # p = 0.5
  assert tops == set(range(9))  # every crop offset 0..margin occurs
  no_flip = [input_pipeline.train_transform(image, np.random.default_rng(s), img_size=32, margin=8,
                                            flip=False)[16, 0, 0] for s in range(20)]
  assert min(no_flip) > 0.9


def test_test_transform_resizes_and_scales():
  image = np.full((30, 20, 3), 255, np.uint8)
  image[..., 2] = 0
  out = input_pipeline.test_transform(image, img_size=16)
  assert out.shape == (16, 16, 3)
  np.testing.assert_allclose(out[..., 0], 1.0)
  np.testing.assert_allclose(out[..., 2], -1.0)


def test_batches_are_a_function_of_the_step_and_differ_between_domains(tmp_path):
  rng = np.random.default_rng(0)
  sources = {s: [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(5)]
             for s in ("trainA", "trainB")}
  config = data_config("", "")
  stream = input_pipeline.train_batches(sources, config, img_size=16, global_batch_size=2, seed=3)
  batches = [next(stream) for _ in range(6)]
  resumed = input_pipeline.train_batches(sources, config, img_size=16, global_batch_size=2, seed=3,
                                         start_step=4)
  np.testing.assert_array_equal(next(resumed)["A"], batches[4]["A"])
  assert not np.array_equal(batches[0]["A"], batches[1]["A"])



def test_processes_read_their_rows_of_the_same_global_batches():
  rng = np.random.default_rng(1)
  sources = {s: [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(5)]
             for s in ("trainA", "trainB")}
  config = data_config("", "")
  one = input_pipeline.train_batches(sources, config, img_size=16, global_batch_size=4, seed=3, start_step=1)
  shards = [input_pipeline.train_batches(sources, config, img_size=16, global_batch_size=4, seed=3,
                                         start_step=1, process_index=p, process_count=2) for p in (0, 1)]
  for _ in range(3):  # crosses an epoch boundary (5 images, 4 per batch)
    whole, parts = next(one), [next(s) for s in shards]
    for domain in ("A", "B"):
      assert parts[0][domain].shape == (2, 16, 16, 3)
      np.testing.assert_array_equal(np.concatenate([p[domain] for p in parts]), whole[domain])
  with pytest.raises(ValueError, match="not divisible by 3 processes"):
    input_pipeline.train_batches(sources, config, img_size=16, global_batch_size=4, seed=3, process_count=3)


def test_animal_mnist_split_is_disjoint_and_fixed():
  labels = np.repeat(np.arange(10), 1000)
  train, test = datasets.animal_mnist_split(labels, 7)
  assert len(train) == 800 and len(test) == 200 and not set(train) & set(test)
  assert set(train) | set(test) == set(range(7000, 8000))
  np.testing.assert_array_equal(datasets.animal_mnist_split(labels, 7)[1], test)
