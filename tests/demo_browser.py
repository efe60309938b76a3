"""The demo in a real browser: start `python main.py --mode=demo` on a free port, and the headless
Chromium flags for this machine's closed network. Used by tests/test_demo.py and docs/demo_screenshot.py.
"""

import contextlib
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps opening connections the network refuses.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def sigint_not_ignored():
  """SIGINT with its default action while a child is started inside (restored after): a suite started
  in the background (`cmd &`) ignores it, a child inherits that, and stop_demo's Ctrl-C would then only
  end the demo at the kill 30 s later."""
  ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  if ignored:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
  try:
    yield
  finally:
    if ignored:
      signal.signal(signal.SIGINT, signal.SIG_IGN)


def start_demo(workdir, log: pathlib.Path, timeout_s: float = 240) -> tuple[subprocess.Popen, str]:
  """`python main.py --mode=demo --workdir=...` on a free port, its output in `log`; (process, URL)
  once the page answers. RuntimeError with the log's end if it exits or does not answer in time."""
  port = free_port()
  with open(log, "w") as out, sigint_not_ignored():
    process = subprocess.Popen([sys.executable, "main.py", "--mode=demo", f"--workdir={workdir}",
                                f"--port={port}"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                               env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
  url = f"http://127.0.0.1:{port}/"
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      urllib.request.urlopen(url, timeout=5).read()
      return process, url
    except OSError:
      if process.poll() is not None or time.monotonic() > deadline:
        process.kill()
        raise RuntimeError(f"the demo did not start:\n{log.read_text()[-3000:]}") from None
      time.sleep(1)


def stop_demo(process: subprocess.Popen) -> None:
  """Ctrl-C, as a user stops it; killed if still running 30 s later."""
  process.send_signal(signal.SIGINT)
  try:
    process.wait(timeout=30)
  except subprocess.TimeoutExpired:
    process.kill()
