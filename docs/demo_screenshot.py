"""Makes docs/demo.png: the demo page of a trained run after translating its first test image.

Starts `python main.py --mode=demo` on a free port, opens it in headless Chromium (Debian's
/usr/bin/chromium, driven by Playwright), clicks the first sample, presses Translate, waits for the
translation and saves a screenshot of the page.

  python docs/demo_screenshot.py --workdir=runs/demo [--out=docs/demo.png]
"""

import argparse
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", default=str(ROOT / "docs" / "demo.png"))
  parser.add_argument("--chromium", default="/usr/bin/chromium")
  args = parser.parse_args()
  from playwright.sync_api import sync_playwright

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = subprocess.Popen([sys.executable, "main.py", "--mode=demo", f"--workdir={args.workdir}",
                             f"--port={port}"], cwd=ROOT)
  url = f"http://127.0.0.1:{port}/"
  try:
    for _ in range(300):
      try:
        urllib.request.urlopen(url, timeout=5).read()
        break
      except OSError:
        if server.poll() is not None:
          sys.exit("the demo did not start")
        time.sleep(1)
    with sync_playwright() as playwright:
      browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS)
      page = browser.new_page(viewport={"width": 1280, "height": 900})
      page.goto(url, wait_until="networkidle")
      page.locator("#samples button").first.click()
      page.locator("#upload img").wait_for(state="attached", timeout=60_000)
      page.locator("#translate").click()
      for elem_id in ("input", "translation", "attention", "round_trip"):
        page.locator(f"#{elem_id} img").wait_for(state="visible", timeout=300_000)
      page.wait_for_timeout(1000)  # the images' fade-in
      page.screenshot(path=args.out, full_page=True)
      browser.close()
    print(f"Wrote {args.out}")
  finally:
    server.terminate()
    server.wait(timeout=30)


if __name__ == "__main__":
  main()
