"""The browser demo: drop an image, pick a direction, see its translation beside the input.

Owns: what the page shows for one upload (`demo_views`: the input, its translation, where the source
discriminator's encoder attends drawn over the input, and the round trip back), the one-line message
a bad upload gets (`read_upload`), the clickable samples from the run's test splits (`write_samples`),
the page (`build_app`) and `serve`, which loads the translator once and serves it to every visitor.

  python main.py --mode=demo --workdir=runs/demo            # http://127.0.0.1:7860
  python main.py --mode=demo --workdir=runs/demo --share    # and a public *.gradio.live link

Gradio is an extra (`pip install .[demo]`, or `-r requirements-demo.txt`): this module imports it only
in `build_app` and `serve`, so the rest of the library never needs it.
"""

from __future__ import annotations

import pathlib
import re
import tempfile
from typing import Any, NamedTuple

import numpy as np
from absl import logging
from PIL import Image

from nicegan_jax import datasets, inference, visualize

SAMPLES_PER_DOMAIN = 4
MAX_UPLOAD_PIXELS = 40_000_000  # 40 MP: larger images are refused before they are decoded
MAX_UPLOAD_BYTES = 50 * 2**20  # larger files are refused by the server as they arrive

# The views fill their boxes, small images scaled up by the browser with square pixels; the PNGs
# served stay at the input's size.
VIEW_CSS = ".view img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"


class UploadError(ValueError):
  """An upload the demo cannot translate; its message is shown on the page."""


class Views(NamedTuple):
  """What the page shows for one input, every image (H, W, 3) uint8 at the input's size."""
  input: np.ndarray
  translation: np.ndarray
  attention: np.ndarray  # the source encoder's attention (JET) over the input
  round_trip: np.ndarray  # the translation translated back


def domain_names(data_config) -> tuple[str, str]:
  """Readable names of domains A and B: from a dataset name like "cycle_gan/horse2zebra" or an image
  folder like "dataset/selfie2anime" ("horse", "zebra"); "A", "B" when the name says nothing."""
  kind, _, name = data_config.dataset.partition("/")
  if kind == "image_folder":
    name = pathlib.Path(data_config.path or "").name
  match = re.fullmatch(r"([A-Za-z0-9_-]+?)2([A-Za-z0-9_-]+)", name or "")
  return (match.group(1), match.group(2)) if match else ("A", "B")


def direction_labels(data_config) -> dict[str, str]:
  """Direction -> its label on the page: {"A2B": "horse → zebra", "B2A": "zebra → horse"}."""
  names = dict(zip("AB", domain_names(data_config)))
  return {d: f"{names[inference.domains(d)[0]]} → {names[inference.domains(d)[1]]}"
          for d in inference.DIRECTIONS}


def read_upload(path) -> np.ndarray:
  """An uploaded file as (H, W, 3) uint8, or UploadError with one line naming what is wrong (no file,
  not an image, too large, an image mode without a standard range), as the folder command reports."""
  if path is None:
    raise UploadError("Drop or pick an image first.")
  path = pathlib.Path(path)
  in_words = lambda e: " ".join(str(e).replace(str(path), path.name).split())  # no server paths
  try:
    with Image.open(path) as probe:
      width, height = probe.size
  except Exception as e:  # PIL raises many types for bad files
    raise UploadError(f"{path.name} is not an image this demo can read ({in_words(e)}).") from None
  if width * height > MAX_UPLOAD_PIXELS:
    raise UploadError(f"{path.name} is {width}x{height}: the demo takes images of at most "
                      f"{MAX_UPLOAD_PIXELS // 1_000_000} megapixels.")
  try:
    return datasets.read_rgb(path)
  except datasets.DataError as e:
    cause = e.__cause__ if e.__cause__ is not None else e
    raise UploadError(f"{path.name} cannot be read as an RGB image ({in_words(cause)}).") from None


def demo_views(translator: inference.Translator, image: np.ndarray, direction: str) -> Views:
  """The four views of one uint8 image; the translation is exactly `inference.translate`'s."""
  try:
    translation = inference.translate(translator, image, direction)
    attention = inference.attention(translator, image, direction)
  except ValueError as e:  # readable, but outside translate's contract (e.g. smaller than 4x4)
    raise UploadError(f"This image cannot be translated: {e}.") from None
  reverse = "B2A" if direction == "A2B" else "A2B"
  round_trip = inference.translate(translator, translation, reverse)
  return Views(image, translation, visualize.overlay_attention(image, attention), round_trip)


def sample_images(data_config, img_size: int, per_domain: int) -> dict[str, list[np.ndarray]]:
  """The first `per_domain` images of testA and testB, without downloading or preparing anything: an
  image folder's files are read directly (unreadable ones skipped), a TFDS dataset only when it is
  already prepared. DataError when the dataset is not on this machine."""
  kind, _, name = data_config.dataset.partition("/")
  if kind == "image_folder":
    root = pathlib.Path(data_config.path or "").expanduser()
    images = {}
    for split in ("testA", "testB"):
      images[split] = []
      for path in datasets.list_images(root / split) if (root / split).is_dir() else []:
        try:
          images[split].append(datasets.read_rgb(path))
        except datasets.DataError:
          continue
        if len(images[split]) == per_domain:
          break
    return images
  if kind == "cycle_gan" and not datasets.cycle_gan_prepared(name, datasets.cache_dir_of(data_config)):
    raise datasets.DataError(f"cycle_gan/{name} is not prepared on this machine (not downloaded for samples)")
  sources = datasets.load_domains(data_config, img_size)
  return {split: [np.asarray(sources[split][i], np.uint8) for i in range(min(per_domain, len(sources[split])))]
          for split in ("testA", "testB")}


def write_samples(translator: inference.Translator, folder: pathlib.Path,
                  per_domain: int = SAMPLES_PER_DOMAIN) -> list[list[str]]:
  """The first images of each test split (`sample_images`) as PNGs in `folder`: [[path, direction],
  ...], testA's with A2B and testB's with B2A. Empty when the run's dataset is not on this machine (the
  page then offers no samples)."""
  config = translator.config
  try:
    images = sample_images(config.data, config.model.img_size, per_domain)
  except Exception as e:  # a dataset that is not on this machine: the demo still serves uploads
    logging.warning("No sample images: the run's test splits cannot be read here (%s)", e)
    return []
  folder.mkdir(parents=True, exist_ok=True)
  samples = []
  for direction in inference.DIRECTIONS:
    split = f"test{inference.domains(direction)[0]}"
    for i, image in enumerate(images[split]):
      path = folder / f"{split}_{i}.png"
      Image.fromarray(image).save(path)
      samples.append([str(path), direction])
  return samples


def undecoded_upload(image_input):
  """Makes a gr.Image input hand the uploaded file's path to the handler undecoded. Gradio's own
  preprocessing opens the file first, so a bad one would fail there, in Gradio's words, instead of in
  `read_upload`. (On the instance: a gr.Image subclass would make Gradio write a .pyi file beside this
  module.)"""
  image_input.preprocess = lambda payload: None if payload is None else payload.path
  return image_input


def system_font_theme(gr):
  """Gradio's default theme on the machine's own fonts: the page fetches nothing from the internet."""
  return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                           font_mono=["ui-monospace", "monospace"])


def build_app(translator: inference.Translator, samples: list[list[str]] | None = None):
  """The page: an upload, a direction, Translate; below it the input, the translation (downloadable as
  PNG), the attention over the input and the round trip. Errors appear on the page as one message."""
  import gradio as gr  # an extra: pip install .[demo]

  labels = direction_labels(translator.config.data)
  by_label = {label: direction for direction, label in labels.items()}
  model = translator.config.model
  step = f", trained {translator.step} steps" if translator.step is not None else ""

  def run(path, label):
    try:
      views = demo_views(translator, read_upload(path), by_label[label])
    except UploadError as e:
      raise gr.Error(str(e), print_exception=False) from None
    return tuple(views)

  with gr.Blocks(title="NICE-GAN demo", analytics_enabled=False) as app:
    gr.Markdown(f"## NICE-GAN: {labels['A2B']}, and back\n"
                f"A {'light' if model.light else 'full'} {model.img_size}x{model.img_size} model{step}. "
                "Drop or pick an image, choose the direction and press Translate.")
    with gr.Row():
      upload = undecoded_upload(gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"],
                                         height=320, elem_id="upload", elem_classes=["view"]))
      with gr.Column():
        direction = gr.Radio(list(by_label), value=labels["A2B"], label="Direction", elem_id="direction")
        button = gr.Button("Translate", variant="primary", elem_id="translate")
        if samples:
          gallery = gr.Dataset(components=[upload], samples=[[path] for path, _ in samples], type="index",
                               layout="gallery", samples_per_page=len(samples), elem_id="samples",
                               label="Samples from the test splits: click one")
          gallery.click(lambda i: (samples[i][0], labels[samples[i][1]]), inputs=gallery,
                        outputs=[upload, direction], api_name=False)
    with gr.Row():
      shown = dict(height=256, interactive=False, format="png", elem_classes=["view"])
      outputs = [gr.Image(label="Input", elem_id="input", buttons=[], **shown),
                 gr.Image(label="Translation", elem_id="translation", buttons=["download"], **shown),
                 gr.Image(label="Where the encoder looks (CAM)", elem_id="attention", buttons=[], **shown),
                 gr.Image(label="Round trip back", elem_id="round_trip", buttons=[], **shown)]
    button.click(run, inputs=[upload, direction], outputs=outputs, api_name="translate")
  return app


def serve(workdir: str | pathlib.Path, *, host: str = "127.0.0.1", port: int | None = 7860,
          share: bool = False, concurrency: int = 4, block: bool = True) -> Any:
  """Loads the translator once (`inference.load_translator`) and serves the page to every visitor,
  `concurrency` translations at a time, on `port` (None: the first free one from 7860). Returns the
  Gradio app (with `block=False`, still serving: its `local_url`, `share_url`, `close()`)."""
  import gradio as gr  # before any loading: a missing extra is reported at once

  translator = inference.load_translator(workdir)
  print(f"Loaded the translator of {workdir} (step {translator.step}); serving it to every visitor",
        flush=True)
  samples_dir = pathlib.Path(tempfile.mkdtemp(prefix="nicegan_demo_"))
  app = build_app(translator, write_samples(translator, samples_dir))
  app.queue(default_concurrency_limit=concurrency)
  app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
             allowed_paths=[str(samples_dir)], max_file_size=MAX_UPLOAD_BYTES,
             theme=system_font_theme(gr), css=VIEW_CSS, footer_links=[])
  return app
