"""TensorFlow is kept off the GPUs before clu's writers or the TFDS builders use it."""

import logging

import pytest
import tensorflow as tf
from clu import metric_writers

from nicegan_jax import datasets, tf_host, train


@pytest.fixture
def fresh_guard():
  tf_host.keep_tensorflow_on_host.cache_clear()
  yield tf_host.keep_tensorflow_on_host
  tf_host.keep_tensorflow_on_host.cache_clear()


def test_tensorflow_sees_no_gpu_and_is_told_once(fresh_guard, monkeypatch):
  calls = []
  monkeypatch.setattr(tf.config, "set_visible_devices", lambda devices, kind: calls.append((devices, kind)))
  fresh_guard()
  fresh_guard()
  assert calls == [([], "GPU")]


def test_tensorflow_that_already_holds_a_gpu_is_reported(fresh_guard, monkeypatch, caplog):
  def too_late(devices, kind):
    raise RuntimeError("Visible devices cannot be modified after being initialized")
  monkeypatch.setattr(tf.config, "set_visible_devices", too_late)
  monkeypatch.setattr(tf.config, "get_visible_devices", lambda kind: ["/physical_device:GPU:0"])
  with caplog.at_level(logging.WARNING):
    fresh_guard()
  assert "TensorFlow already holds GPU(s)" in caplog.text


def test_tensorflow_already_initialised_without_gpus_is_fine(fresh_guard, monkeypatch, caplog):
  def too_late(devices, kind):
    raise RuntimeError("Visible devices cannot be modified after being initialized")
  monkeypatch.setattr(tf.config, "set_visible_devices", too_late)
  monkeypatch.setattr(tf.config, "get_visible_devices", lambda kind: [])
  with caplog.at_level(logging.WARNING):
    fresh_guard()
  assert "GPU" not in caplog.text


def test_writers_and_tfds_preparation_hide_the_gpus_first(monkeypatch, tmp_path):
  events = []
  monkeypatch.setattr(tf_host, "keep_tensorflow_on_host", lambda: events.append("hidden"))
  def summary_writer(logdir):
    events.append("writer")
    return metric_writers.MultiWriter([])

  monkeypatch.setattr(metric_writers, "SummaryWriter", summary_writer)  # create_writer imports it when called
  train.create_writer(tmp_path).close()
  assert events == ["hidden", "writer"]

  events.clear()
  with pytest.raises(datasets.DataError):  # no images: refused after the GPUs were hidden
    datasets.image_folder_sources(str(tmp_path), tmp_path / "cache")
  assert events == ["hidden"]
