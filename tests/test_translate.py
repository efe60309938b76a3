"""translate(): the input contract, equality with the train-time forward, the folder and test commands."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import test as test_config
from conftest import ROOT, SHARED_DATA, image_size_and_mode, uniform, write_tiny_checkpoint
from nicegan_jax import input_pipeline, models, translate_files
from nicegan_jax import inference as translate_lib


def make_dataset(root: pathlib.Path) -> pathlib.Path:
  rng = np.random.default_rng(0)
  for split in ("trainA", "trainB", "testA", "testB"):
    (root / split / "nested").mkdir(parents=True)
    for i in range(2):
      Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 50, 3), dtype=np.uint8)).save(
          root / split / f"{i}.jpg")
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(root / split / "nested" / "n.png")
  return root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir holding one checkpoint of a freshly initialised tiny model (as training writes it)."""
  root = tmp_path_factory.mktemp("translate")
  config = test_config.get_config()
  config.data.path = str(make_dataset(root / "data"))
  config.data.data_dir = str(root / "cache")
  config, nets, state = write_tiny_checkpoint(root / "run" / "checkpoints", 3, config)
  return root / "run", config, nets, jax.device_get(state)


@pytest.fixture(scope="module")
def translator(workdir):
  return translate_lib.load_translator(workdir[0])


def test_load_reads_config_and_only_inference_weights(workdir, translator):
  _, config, _, state = workdir
  assert translator.config.model.to_dict() == config.model.to_dict()
  np.testing.assert_array_equal(translator.generators["A2B"]["UpBlock0_1"]["kernel"],
                                state.gen_params["gen2B"]["UpBlock0_1"]["kernel"])
  np.testing.assert_array_equal(translator.encoders["B2A"]["spectral"]["fc"]["v"],
                                state.spectral["disB"]["fc"]["v"])
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    translate_lib.load_translator(workdir[0].parent / "data")


def test_load_accepts_a_relative_workdir(workdir, monkeypatch):
  monkeypatch.chdir(workdir[0].parent)
  relative = translate_lib.load_translator(workdir[0].name)
  np.testing.assert_array_equal(relative.generators["B2A"]["FC_0"]["kernel"],
                                np.asarray(workdir[3].gen_params["gen2A"]["FC_0"]["kernel"]))


def test_translate_equals_the_train_time_forward(workdir, translator):
  _, config, nets, state = workdir
  x = uniform(5, (2, 64, 64, 3))
  for direction, disc, gen in (("A2B", "disA", "gen2B"), ("B2A", "disB", "gen2A")):
    z = models.encode(getattr(nets, disc), {"params": state.disc_params[disc],
                                            "spectral": state.spectral[disc]}, x)
    want = models.decode(getattr(nets, gen), state.gen_params[gen], z)
    got = translate_lib.translate(translator, np.asarray(x), direction)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_contract_shapes_dtypes_single_and_batch(translator):
  rng = np.random.default_rng(0)
  single = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
  out = translate_lib.translate(translator, single)
  assert out.shape == (50, 70, 3) and out.dtype == np.uint8  # the input's own (non-square) size
  batch = translate_lib.translate(translator, np.stack([single, single[::-1]]), "B2A")
  assert batch.shape == (2, 50, 70, 3) and batch.dtype == np.uint8
  as_float = translate_lib.translate(translator, single.astype(np.float32) / 127.5 - 1)
  assert as_float.dtype == np.float32 and as_float.min() >= -1 and as_float.max() <= 1
  np.testing.assert_allclose(as_float, out.astype(np.float32) / 127.5 - 1, atol=1.5 / 127.5)
  native = translate_lib.translate(translator, single, native=True)
  assert native.shape == (50, 70, 3)
  assert translate_lib.translation_size(50, 70, 64, native=True) == (52, 72)


def test_inputs_of_new_sizes_compile_no_new_network_program(translator):
  rng = np.random.default_rng(7)
  translate_lib.translate(translator, rng.integers(0, 256, (41, 57, 3), dtype=np.uint8))
  compiled = translate_lib.translate_at_work_size._cache_size()
  for shape in ((23, 90, 3), (64, 64, 3), (130, 71, 3)):
    out = translate_lib.translate(translator, rng.integers(0, 256, shape, dtype=np.uint8))
    assert out.shape == shape
  translate_lib.translate(translator, rng.uniform(-1, 1, (77, 33, 3)).astype(np.float32))
  assert translate_lib.translate_at_work_size._cache_size() == compiled


def test_a_uint8_image_is_resized_as_the_test_transform_resizes(workdir, translator):
  _, _, nets, state = workdir
  image = np.random.default_rng(8).integers(0, 256, (50, 70, 3), dtype=np.uint8)
  seen = input_pipeline.to_unit_range(input_pipeline.resize(image, 64))  # what the test split feeds
  z = models.encode(nets.disA, {"params": state.disc_params["disA"], "spectral": state.spectral["disA"]},
                    seen[None])
  want = translate_lib.resize_images(np.asarray(models.decode(nets.gen2B, state.gen_params["gen2B"], z)),
                                     (50, 70))
  want = np.clip(np.round((np.clip(want, -1, 1) + 1) * 127.5), 0, 255)
  got = translate_lib.translate(translator, image).astype(np.float64)
  assert np.abs(got - want[0]).max() <= 1  # float rounding at the uint8 boundary only


def test_float_planes_resize_like_uint8_images_without_rounding():
  image = np.random.default_rng(9).integers(0, 256, (1, 30, 40, 3), dtype=np.uint8)
  for size in ((15, 20), (61, 83)):  # shrinking (antialiased) and enlarging
    as_uint8 = translate_lib.resize_images(image, size).astype(np.float64)
    as_float = translate_lib.resize_images(image.astype(np.float32), size)
    assert as_float.shape == as_uint8.shape == (1, *size, 3) and as_float.dtype == np.float32
    assert np.abs(as_float - as_uint8).max() <= 1.0  # the uint8 result is the float one, rounded
    assert not np.all(as_float == np.round(as_float))


def test_chunks_cover_the_batch_in_one_shape():
  images = np.arange(11)[:, None, None, None] * np.ones((11, 2, 2, 3))
  got = list(input_pipeline.padded_chunks(images, 4))
  assert [c.shape[0] for c, _ in got] == [4, 4, 4] and [n for _, n in got] == [4, 4, 3]
  np.testing.assert_array_equal(np.concatenate([c[:n] for c, n in got]), images)
  assert (got[-1][0][3] == 10).all()  # padded with the last real image
  assert [n for _, n in input_pipeline.padded_chunks(images, None)] == [11]
  assert [n for _, n in input_pipeline.padded_chunks(images[:3], 4)] == [3]  # small batches stay whole
  assert translate_lib.chunk_size("cpu") == 8 and translate_lib.chunk_size("gpu") is None


def test_a_batch_larger_than_a_chunk_equals_image_by_image(translator):
  images = np.random.default_rng(3).integers(0, 256, (10, 64, 64, 3), dtype=np.uint8)
  batch = translate_lib.translate(translator, images)  # on this CPU: chunks of 8 and 2 (+6 padding)
  one_by_one = np.stack([translate_lib.translate(translator, image) for image in images])
  assert np.abs(batch.astype(int) - one_by_one.astype(int)).max() <= 1  # rounding to uint8 only


@pytest.mark.parametrize("bad,message", [
    (np.zeros((8, 8)), "must be \\(H, W, 3\\)"),
    (np.zeros((1, 1, 8, 8, 3)), "must be \\(H, W, 3\\)"),
    (np.zeros((8, 8, 4), np.uint8), "3 \\(RGB\\) channels"),
    (np.zeros((8, 8, 3), np.int32), "uint8 in \\[0, 255\\] or floating point"),
    (np.full((8, 8, 3), 255.0, np.float32), "must lie in \\[-1, 1\\]"),
    (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
    (np.zeros((2, 2, 3), np.uint8), "at least 4x4"),
    ([np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)], "cannot form one batch"),
    ([np.zeros((8, 8, 3), np.uint8), None], "cannot form one batch"),
    (None, "array of numbers"),
    ("horse.jpg", "not a path"),
    (pathlib.Path("horse.jpg"), "not a path"),
])
def test_bad_inputs_get_a_clear_error(translator, bad, message):
  with pytest.raises(ValueError, match=message):
    translate_lib.translate(translator, bad)


def test_bad_direction(translator):
  with pytest.raises(ValueError, match="direction"):
    translate_lib.translate(translator, np.zeros((8, 8, 3), np.uint8), "A2A")


def run_main(*args):
  return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_folder_command_mirrors_names_reports_bad_files_and_spares_inputs(workdir, tmp_path):
  src = tmp_path / "in"
  (src / "sub").mkdir(parents=True)
  rng = np.random.default_rng(1)
  Image.fromarray(rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)).save(src / "odd.JPEG")
  Image.fromarray(rng.integers(0, 256, (64, 20), dtype=np.uint8)).save(src / "sub" / "gray.png")
  (src / "sub" / "broken.jpg").write_bytes(b"not a jpeg")
  Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).save(src / "tiny.png")
  out = tmp_path / "out"
  result = run_main("--mode=translate", f"--workdir={workdir[0]}", f"--input={src}", f"--output={out}",
                    "--direction=B2A")
  assert result.returncode == 1, result.stderr[-2000:]  # the bad files are reported, not fatal
  assert "Wrote 2 image(s)" in result.stdout and "broken.jpg" in result.stdout
  assert "cannot translate" in result.stdout and "tiny.png: images must be at least 4x4" in result.stdout
  assert "Traceback" not in result.stderr
  assert image_size_and_mode(out / "odd.png")[0] == (47, 33)
  assert image_size_and_mode(out / "sub" / "gray.png") == ((20, 64), "RGB")
  # Writing next to the inputs never replaces one.
  before = (src / "sub" / "gray.png").read_bytes()
  result = run_main("--mode=translate", f"--workdir={workdir[0]}", f"--input={src / 'sub' / 'gray.png'}",
                    f"--output={src / 'sub'}")
  assert "would overwrite an input" in result.stdout
  assert (src / "sub" / "gray.png").read_bytes() == before


def test_inputs_that_share_a_name_keep_their_extensions_and_none_is_lost(workdir, tmp_path):
  src = tmp_path / "in"
  src.mkdir()
  rng = np.random.default_rng(2)
  for name in ("a.jpg", "a.png", "b.png", "A.bmp"):
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(src / name)
  names = translate_files.output_names(src, sorted(src.iterdir()))
  assert {f.name: str(rel) for f, rel in names.items()} == {
      "a.jpg": "a.jpg.png", "a.png": "a.png.png", "A.bmp": "A.bmp.png", "b.png": "b.png"}
  report = translate_files.translate_folder(translate_lib.load_translator(workdir[0]), src, tmp_path / "out",
                                            progress=False)
  assert len(report.written) == 4 and len({p.name.lower() for p in report.written}) == 4
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["A.bmp.png", "a.jpg.png", "a.png.png",
                                                                  "b.png"]
  (src / "a.jpg.png").write_bytes((src / "b.png").read_bytes())  # now a.jpg's new name is taken too
  with pytest.raises(translate_files.OutputError, match="would be written to one output file"):
    translate_files.output_names(src, sorted(src.iterdir()))


def test_an_output_inside_the_input_or_that_is_a_file_is_refused_before_any_work(workdir, tmp_path):
  src = tmp_path / "in"
  src.mkdir()
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(src / "a.png")
  (tmp_path / "a_file").write_text("x")
  for output, message in ((src / "out", "is inside the input folder"), (src, "is inside the input folder"),
                          (tmp_path / "a_file", "is a file; give a folder")):
    result = run_main("--mode=translate", f"--workdir={workdir[0]}", f"--input={src}", f"--output={output}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and message in result.stderr
  assert sorted(p.name for p in src.iterdir()) == ["a.png"] and (tmp_path / "a_file").read_text() == "x"


def test_a_sixteen_bit_image_translates_like_its_eight_bit_twin(translator, tmp_path):
  ramp16 = (np.arange(48 * 40).reshape(48, 40) * 34).astype(np.uint16)
  Image.fromarray(ramp16).save(tmp_path / "deep.png")
  eight = ((ramp16.astype(np.uint32) + 128) // 257).astype(np.uint8)
  Image.fromarray(eight).save(tmp_path / "flat.png")
  assert image_size_and_mode(tmp_path / "deep.png")[1] == "I;16"
  deep, flat = (translate_files.datasets.read_rgb(tmp_path / name) for name in ("deep.png", "flat.png"))
  np.testing.assert_array_equal(deep, flat)
  np.testing.assert_array_equal(translate_lib.translate(translator, deep), translate_lib.translate(translator, flat))


def test_folder_command_refuses_a_folder_without_images(workdir, tmp_path):
  (tmp_path / "in" / "sub").mkdir(parents=True)
  (tmp_path / "in" / "notes.txt").write_text("not an image")
  result = run_main("--mode=translate", f"--workdir={workdir[0]}", f"--input={tmp_path / 'in'}",
                    f"--output={tmp_path / 'out'}")
  assert result.returncode == 1
  assert f"error: no images under {tmp_path / 'in'}" in result.stderr
  assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_native_translation_of_a_full_model_is_refused_before_any_file(tmp_path):
  config = test_config.get_config()
  config.model.light = False
  write_tiny_checkpoint(tmp_path / "full" / "checkpoints", 1, config)
  (tmp_path / "in").mkdir()
  Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "in" / "a.png")
  with pytest.raises(ValueError, match="needs a light model"):
    translate_files.translate_folder(translate_lib.load_translator(tmp_path / "full"), tmp_path / "in",
                                     tmp_path / "out", native=True)
  result = run_main("--mode=translate", f"--workdir={tmp_path / 'full'}", f"--input={tmp_path / 'in'}",
                    f"--output={tmp_path / 'out'}", "--native")
  assert result.returncode == 1
  assert "--native: native-resolution translation needs a light model" in result.stderr
  assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_main_keeps_compiled_programs_in_the_cache_folder_unless_told_not_to(workdir, tmp_path):
  image = tmp_path / "in.png"
  Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # not the tests' cache
  env.update(JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  stderr = {}
  for name, flag in (("default", []), ("off", ["--compilation_cache_dir="]),
                     ("unwritable", [f"--compilation_cache_dir={image}/cache"])):  # under a file
    result = subprocess.run([sys.executable, "main.py", "--mode=translate", f"--workdir={workdir[0]}",
                             f"--input={image}", f"--output={tmp_path / 'out'}", *flag], cwd=ROOT,
                            capture_output=True, text=True, timeout=600,
                            env={**env, "NICEGAN_JAX_CACHE": str(tmp_path / name)})
    assert result.returncode == 0, result.stderr[-2000:]
    stderr[name] = result.stderr
  assert any((tmp_path / "default" / "xla_cache").iterdir())  # the translation program, at least
  assert not (tmp_path / "off").exists()
  assert f"No compilation cache: cannot create {image}/cache" in stderr["unwritable"]
  assert "persistent compilation cache" not in stderr["unwritable"]  # JAX's warning at every compile


@pytest.mark.skipif(not (SHARED_DATA / "selfie2anime_sample").is_dir(),
                    reason="../shared/data/selfie2anime_sample is not present")
def test_folder_command_on_real_images(workdir, tmp_path):
  result = run_main("--mode=translate", f"--workdir={workdir[0]}",
                    f"--input={SHARED_DATA / 'selfie2anime_sample'}", f"--output={tmp_path}")
  assert result.returncode == 0, result.stderr[-2000:]
  for split in ("trainA", "trainB", "testA", "testB"):
    [original] = list((SHARED_DATA / "selfie2anime_sample" / split).iterdir())
    translated = tmp_path / split / (original.stem + ".png")
    assert image_size_and_mode(translated)[0] == image_size_and_mode(original)[0]


def test_test_split_mode_writes_fakeA_and_fakeB(workdir):
  result = run_main("--mode=test", f"--workdir={workdir[0]}")
  assert result.returncode == 0, result.stderr[-2000:]
  test_dir = workdir[0] / "test"
  assert sorted(p.name for p in (test_dir / "fakeB").iterdir()) == ["0.png", "1.png", "nested"]
  assert (test_dir / "fakeA" / "nested" / "n.png").is_file()
  assert image_size_and_mode(test_dir / "fakeB" / "1.png")[0] == (64, 64)  # the training size, as the original


def test_evaluate_mode_scores_both_directions(workdir):
  from nicegan_jax import inception
  try:
    inception.fetch_weights()
  except inception.WeightsError as e:
    pytest.skip(f"the FID Inception weights could not be fetched: {e}")
  result = run_main("--mode=evaluate", f"--workdir={workdir[0]}", "--max_images=2")  # of 3 per split
  assert result.returncode == 0, result.stderr[-2000:]
  assert "A2B (step 3): FID" in result.stdout and "B2A (step 3): FID" in result.stdout
  import json
  scores = json.loads((workdir[0] / "eval_0000003.json").read_text())
  for direction in ("A2B", "B2A"):
    assert scores[direction]["n_real"] == 2 and scores[direction]["n_fake"] == 2
    assert np.isfinite(scores[direction]["fid"]) and np.isfinite(scores[direction]["kid_x100"])
  from tensorboard.backend.event_processing import event_accumulator as ea
  [events] = list(workdir[0].glob("events.out.tfevents.*"))
  acc = ea.EventAccumulator(str(events), size_guidance={ea.TENSORS: 0})
  acc.Reload()
  assert {"eval/A2B/fid", "eval/B2A/kid_x100"} <= set(acc.Tags()["tensors"])


def test_the_library_imports_without_the_training_input_pipeline_packages():
  # grain builds the training batches only; translation (e.g. on an accelerator image without it) and
  # the speed benchmark import the library without it.
  code = ("import sys; sys.modules['grain'] = None\n"
          "import nicegan_jax\n"
          "from nicegan_jax import inference, input_pipeline, models, step, train_state\n"
          "print('ok', nicegan_jax.translate.__name__)")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and "ok translate" in result.stdout, result.stderr[-2000:]


def test_the_command_loads_tensorflow_only_to_write_events():
  # clu's writers bring TensorFlow (seconds at every start); translate, test, export, import and a config
  # error never write events, so main.py and the training module import without it.
  code = ("import sys\n"
          "import main\n"
          "from nicegan_jax import train\n"
          "print('tensorflow' in sys.modules, callable(train.create_writer))\n"
          "from clu import metric_writers\n"
          "print('tensorflow' in sys.modules)")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ["False", "True", "True"]
