"""Makes docs/demo.png: the demo page of a trained run after translating its first test image.

Starts `python main.py --mode=demo` on a free port, opens it in headless Chromium (Debian's
/usr/bin/chromium, driven by Playwright), clicks the first sample, presses Translate, waits for the
translation and saves a screenshot of the page.

  python docs/demo_screenshot.py --workdir=runs/demo [--out=docs/demo.png]
"""

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import demo_browser  # noqa: E402  (the same server start and Chromium flags as the browser tests)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", default=str(ROOT / "docs" / "demo.png"))
  parser.add_argument("--chromium", default=demo_browser.CHROMIUM)
  args = parser.parse_args()
  from playwright.sync_api import sync_playwright

  log = pathlib.Path(args.out).with_suffix(".server.log")
  try:
    server, url = demo_browser.start_demo(args.workdir, log, timeout_s=300)
  except RuntimeError as e:
    sys.exit(str(e))
  try:
    with sync_playwright() as playwright:
      browser = playwright.chromium.launch(executable_path=args.chromium, args=demo_browser.CHROMIUM_FLAGS)
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
    demo_browser.stop_demo(server)
    log.unlink(missing_ok=True)


if __name__ == "__main__":
  main()
