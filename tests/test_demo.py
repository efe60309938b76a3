"""The browser demo: what it shows for an upload, and the real page in headless Chromium.

The browser tests start `python main.py --mode=demo` on a free local port and drive Debian's Chromium
(/usr/bin/chromium, `apt-get install chromium`, which .ci/run installs) with Playwright: no browser is
downloaded at run time. They skip, saying why, where Chromium, Playwright or Gradio is missing.
"""

import os
import pathlib
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from configs import test as test_config
import demo_browser
from conftest import ROOT, write_tiny_checkpoint
from nicegan_jax import demo, inference, visualize



def make_image(path: pathlib.Path, seed: int, size=(70, 50)) -> pathlib.Path:
  """A smooth colour image (gradients with a random tilt), not square, saved as PNG."""
  rng = np.random.default_rng(seed)
  h, w = size[1], size[0]
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  channels = [np.sin(rng.uniform(1, 6) * xx + rng.uniform(1, 6) * yy + rng.uniform(0, 3)) for _ in range(3)]
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.rint(127.5 * (np.stack(channels, -1) + 1)).astype(np.uint8)).save(path)
  return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
  """A tiny model's checkpoint, trained on an image folder whose test splits the demo offers."""
  root = tmp_path_factory.mktemp("demo")
  data = root / "dataset" / "apple2orange"
  for split in ("trainA", "trainB", "testA", "testB"):
    for i in range(2):
      make_image(data / split / f"{i}.png", seed=hash(split) % 1000 + i, size=(64, 64))
  config = test_config.get_config()
  config.data.path = str(data)
  config.data.data_dir = str(root / "tfds")
  write_tiny_checkpoint(root / "run" / "checkpoints", 2, config)
  return root / "run"


@pytest.fixture(scope="module")
def translator(workdir) -> inference.Translator:
  return inference.load_translator(workdir)


def test_names_come_from_the_dataset(translator):
  assert demo.domain_names(translator.config.data) == ("apple", "orange")
  assert demo.direction_labels(translator.config.data) == {"A2B": "apple → orange", "B2A": "orange → apple"}
  config = test_config.get_config()
  config.data.dataset = "cycle_gan/horse2zebra"
  assert demo.domain_names(config.data) == ("horse", "zebra")
  config.data.dataset, config.data.path = "image_folder", "/data/my_photos"
  assert demo.domain_names(config.data) == ("A", "B")


def test_views_are_translate_and_its_round_trip(translator, tmp_path):
  image = np.asarray(Image.open(make_image(tmp_path / "x.png", 0)))
  views = demo.demo_views(translator, image, "B2A")
  np.testing.assert_array_equal(views.input, image)
  np.testing.assert_array_equal(views.translation, inference.translate(translator, image, "B2A"))
  np.testing.assert_array_equal(views.round_trip, inference.translate(translator, views.translation, "A2B"))
  attention = inference.attention(translator, image, "B2A")
  assert attention.shape == image.shape[:2] and attention.min() >= 0 and attention.max() <= 1
  assert attention.max() - attention.min() > 0.5  # scaled per image: the map spans most of [0, 1]
  np.testing.assert_array_equal(views.attention, visualize.overlay_attention(image, attention))
  for view in views:
    assert view.shape == image.shape and view.dtype == np.uint8


def test_attention_is_the_encoders_channel_sum(translator):
  images = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  disc = translator.models.disA
  z = np.asarray(disc.apply(translator.encoders["A2B"], images, update_stats=False, encode_only=True))
  heat = z.sum(-1)
  expected_small = (heat - heat.min((1, 2), keepdims=True)) / np.ptp(heat, (1, 2), keepdims=True)
  maps = np.asarray(inference.attention_at_work_size(translator.encoders["A2B"], images,
                                                     models=translator.models, direction="A2B"))
  np.testing.assert_allclose(maps[..., 0], expected_small, atol=1e-5)
  full = inference.attention(translator, images, "A2B")
  assert full.shape == (2, 64, 64)
  np.testing.assert_allclose(full.mean((1, 2)), expected_small.mean((1, 2)), atol=0.05)


def test_bad_uploads_get_one_line_each(tmp_path, monkeypatch):
  with pytest.raises(demo.UploadError, match="Drop or pick an image first"):
    demo.read_upload(None)
  corrupt = tmp_path / "holiday.png"
  corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
  with pytest.raises(demo.UploadError, match=r"^holiday.png is not an image this demo can read"):
    demo.read_upload(corrupt)
  truncated = tmp_path / "cut.png"
  full = make_image(tmp_path / "whole.png", 1).read_bytes()
  truncated.write_bytes(full[: len(full) // 2])
  with pytest.raises(demo.UploadError, match=r"^cut.png cannot be read as an RGB image"):
    demo.read_upload(truncated)
  floats = tmp_path / "depth.tif"
  Image.fromarray(np.ones((8, 8), np.float32)).save(floats)
  with pytest.raises(demo.UploadError, match="32-bit floating-point image"):
    demo.read_upload(floats)
  monkeypatch.setattr(demo, "MAX_UPLOAD_PIXELS", 100)
  with pytest.raises(demo.UploadError, match=r"whole.png is 70x50: the demo takes images of at most"):
    demo.read_upload(tmp_path / "whole.png")
  with pytest.raises(demo.UploadError) as raised:
    demo.read_upload(corrupt)
  assert "\n" not in str(raised.value) and str(tmp_path) not in str(raised.value)


def test_a_tiny_image_is_refused_in_words(translator):
  with pytest.raises(demo.UploadError, match="cannot be translated: images must be at least 4x4"):
    demo.demo_views(translator, np.zeros((3, 3, 3), np.uint8), "A2B")


def test_samples_are_read_without_downloading_or_preparing(translator, tmp_path):
  images = demo.sample_images(translator.config.data, 64, per_domain=1)
  assert [len(images["testA"]), len(images["testB"])] == [1, 1]
  np.testing.assert_array_equal(
      images["testB"][0], np.asarray(Image.open(pathlib.Path(translator.config.data.path) / "testB/0.png")))
  config = test_config.get_config()
  config.data.dataset, config.data.data_dir = "cycle_gan/horse2zebra", str(tmp_path / "empty_cache")
  with pytest.raises(Exception, match="not prepared on this machine"):
    demo.sample_images(config.data, 64, per_domain=1)
  assert not (tmp_path / "empty_cache").exists() or not any((tmp_path / "empty_cache").rglob("*.array_record*"))
  moved = translator._replace(config=config)
  assert demo.write_samples(moved, tmp_path / "samples") == []  # the page then offers none
  config.data.dataset, config.data.path = "image_folder", str(tmp_path / "gone")
  assert demo.sample_images(config.data, 64, per_domain=1) == {"testA": [], "testB": []}


# The real page, in headless Chromium.


@pytest.fixture(scope="module")
def server(workdir, tmp_path_factory):
  """`python main.py --mode=demo` on a free port: (URL, process, log) once it answers."""
  pytest.importorskip("gradio", reason="the demo extra is not installed (pip install '.[demo]')")
  log = tmp_path_factory.mktemp("server") / "server.log"
  try:
    process, url = demo_browser.start_demo(workdir, log)
  except RuntimeError as e:
    pytest.fail(str(e))
  yield url, process, log
  demo_browser.stop_demo(process)


@pytest.fixture(scope="module")
def browser():
  if not os.path.exists(demo_browser.CHROMIUM):
    pytest.skip(f"no Chromium at {demo_browser.CHROMIUM} (Debian: apt-get install chromium)")
  sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
  with sync_api.sync_playwright() as playwright:
    chromium = playwright.chromium.launch(executable_path=demo_browser.CHROMIUM, headless=True,
                                         args=demo_browser.CHROMIUM_FLAGS)
    yield chromium
    chromium.close()


def shown_image(page, elem_id: str, previous_src: str | None = None) -> np.ndarray:
  """The image an output element shows (a new one, when `previous_src` is given), fetched as the
  browser fetched it and decoded from its PNG."""
  img = page.locator(f"#{elem_id} img")
  img.wait_for(state="visible", timeout=120_000)
  if previous_src is not None:
    page.wait_for_function(
        "([id, old]) => { const i = document.querySelector(`#${id} img`); return i && i.src !== old; }",
        arg=[elem_id, previous_src], timeout=120_000)
  src = img.get_attribute("src")
  response = page.request.get(src)
  assert response.ok, src
  data = response.body()
  assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{elem_id} is not served as PNG"
  path = pathlib.Path(page.context.tmp_dir) / f"{elem_id}.png"
  path.write_bytes(data)
  with Image.open(path) as image:
    return np.asarray(image.convert("RGB")), src


def upload_and_translate(page, path: pathlib.Path, direction_label: str):
  page.locator("#upload input[type=file]").set_input_files(str(path))
  page.locator("#upload img").wait_for(state="attached", timeout=60_000)
  page.get_by_label(direction_label).check()
  page.locator("#translate").click()


def open_page(browser, url, tmp_path):
  context = browser.new_context(viewport={"width": 1400, "height": 1000})
  context.tmp_dir = tmp_path
  page = context.new_page()
  page.goto(url, wait_until="networkidle")
  page.locator("#translate").wait_for(timeout=60_000)
  return page


def test_the_page_shows_translate_output_and_survives_a_corrupt_upload(server, browser, translator,
                                                                        tmp_path):
  url, process, log = server
  page = open_page(browser, url, tmp_path)
  photo = make_image(tmp_path / "photo.png", 7)
  upload_and_translate(page, photo, "orange → apple")
  shown, src = shown_image(page, "translation")
  expected = inference.translate(translator, np.asarray(Image.open(photo).convert("RGB")), "B2A")
  assert shown.shape == expected.shape == (50, 70, 3)
  np.testing.assert_array_equal(shown, expected)
  round_trip, _ = shown_image(page, "round_trip")
  np.testing.assert_array_equal(round_trip, inference.translate(translator, expected, "A2B"))

  corrupt = tmp_path / "broken.png"
  corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
  upload_and_translate(page, corrupt, "apple → orange")
  page.get_by_text("broken.png is not an image this demo can read").first.wait_for(timeout=60_000)
  assert process.poll() is None, "the server died on a corrupt upload"

  second = make_image(tmp_path / "second.png", 8, size=(40, 40))
  upload_and_translate(page, second, "apple → orange")
  shown, _ = shown_image(page, "translation", previous_src=src)
  np.testing.assert_array_equal(
      shown, inference.translate(translator, np.asarray(Image.open(second).convert("RGB")), "A2B"))
  page.context.close()


def test_two_visitors_at_once_and_the_samples(server, browser, translator, tmp_path):
  url, process, log = server
  pages = [open_page(browser, url, tmp_path / str(i)) for i in range(2)]
  for i, page in enumerate(pages):
    (tmp_path / str(i)).mkdir(exist_ok=True)
  photos = [make_image(tmp_path / f"visitor{i}.png", 20 + i) for i in range(2)]
  for page, photo in zip(pages, photos):
    upload_and_translate(page, photo, "apple → orange")
  for page, photo in zip(pages, photos):
    shown, _ = shown_image(page, "translation")
    np.testing.assert_array_equal(
        shown, inference.translate(translator, np.asarray(Image.open(photo).convert("RGB")), "A2B"))
  for page in pages:
    page.context.close()

  page = open_page(browser, url, tmp_path)
  samples = page.locator("#samples button")  # testA's first two, then testB's
  assert samples.count() == 2 * 2, "the test-split samples are not offered"
  samples.last.click()  # testB/1.png: the click also sets the direction, orange -> apple
  page.locator("#upload img").wait_for(state="attached", timeout=60_000)
  assert page.get_by_label("orange → apple").is_checked()
  page.locator("#translate").click()
  shown, _ = shown_image(page, "translation")
  sample = pathlib.Path(translator.config.data.path) / "testB" / "1.png"
  np.testing.assert_array_equal(
      shown, inference.translate(translator, np.asarray(Image.open(sample).convert("RGB")), "B2A"))
  page.context.close()
  assert log.read_text().count("Loaded the translator") == 1, "the model was loaded more than once"


def test_without_gradio_the_command_says_what_to_install(workdir):
  hide_gradio = ("import runpy, sys; sys.modules['gradio'] = None; "
                 f"sys.argv = ['main.py', '--mode=demo', '--workdir={workdir}']; "
                 "runpy.run_path('main.py', run_name='__main__')")
  result = subprocess.run([sys.executable, "-c", hide_gradio], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      "error: --mode=demo needs Gradio: pip install '.[demo]' (or -r requirements-demo.txt)")


def test_a_taken_port_is_named_in_one_line(workdir):
  pytest.importorskip("gradio", reason="the demo extra is not installed (pip install '.[demo]')")
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    result = subprocess.run([sys.executable, "main.py", "--mode=demo", f"--workdir={workdir}",
                             f"--port={port}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: cannot serve on 127.0.0.1:{port} (") and last.endswith("choose another --port")


def test_an_oversized_upload_is_refused_as_it_arrives(server):
  url, process, log = server
  boundary = "nicegan-demo-test"
  head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"huge.png\"\r\n"
          "Content-Type: image/png\r\n\r\n").encode()
  body = head + b"\0" * (demo.MAX_UPLOAD_BYTES + 1) + f"\r\n--{boundary}--\r\n".encode()
  request = urllib.request.Request(url + "gradio_api/upload", data=body, method="POST",
                                   headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
  with pytest.raises(urllib.error.HTTPError) as refused:
    urllib.request.urlopen(request, timeout=120)
  assert refused.value.code == 413
  small = head + b"\0" * 1000 + f"\r\n--{boundary}--\r\n".encode()
  request = urllib.request.Request(url + "gradio_api/upload", data=small, method="POST",
                                   headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
  assert urllib.request.urlopen(request, timeout=120).status == 200  # the limit, not uploads, refused it
  assert process.poll() is None
