"""Make docs/playground.png: the playground after a short real conversation.

    python -m tests.playground.screenshot [--checkpoint DIR] [--out docs/playground.png]

The checkpoint is the bundled one when it exists, else a tiny random model that learns fast
(its replies are noise, but its memory works). It needs what the browser tests need: Debian's
`chromium` and `chromium-driver`, and `selenium`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from hope_core.checkpoint import DEFAULT_CHECKPOINT, WEIGHTS
from tests.playground.conftest import CHROMEDRIVER, CHROMIUM, FAST_LEARNER, browser_missing
from tests.server.support import ROOT, ServerProcess, make_checkpoint

TURNS = ["My favourite colour is teal and my cat is called Pixel.",
         "My favourite colour is teal and my cat is called Pixel.",
         "What is my cat called?"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, help="default: the bundled checkpoint, else a tiny one")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "playground.png")
    p.add_argument("--size", default="1280,800", help="viewport width,height")
    p.add_argument("--max-tokens", type=int, default=24)
    args = p.parse_args()
    missing = browser_missing()
    if missing:
        sys.exit(f"no headless browser: {missing}")

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None and (DEFAULT_CHECKPOINT / WEIGHTS).is_file():
            checkpoint = DEFAULT_CHECKPOINT
        if checkpoint is None:
            checkpoint = make_checkpoint(Path(tmp) / "tiny", **FAST_LEARNER)
        print(f"checkpoint: {checkpoint}")
        server = ServerProcess(checkpoint, "memory://", Path(tmp) / "server.log")
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    "--hide-scrollbars", "--force-device-scale-factor=1",
                    "--disable-background-networking", f"--user-data-dir={tmp}/profile"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        width, height = (int(x) for x in args.size.split(","))
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        try:
            wait = WebDriverWait(driver, 120, poll_frequency=0.1)
            driver.get(f"{server.base_url}/")
            wait.until(lambda d: d.find_element(By.ID, "status").text == "ready")
            for field, value in (("temperature", "0.7"), ("top_k", "40"), ("max_tokens", str(args.max_tokens)),
                                 ("seed", "3")):
                driver.find_element(By.ID, field).clear()
                driver.find_element(By.ID, field).send_keys(value)
            for i, text in enumerate(TURNS):
                driver.find_element(By.ID, "input").send_keys(text)
                driver.find_element(By.ID, "send").click()
                wait.until(lambda d, n=2 * (i + 1): len(d.find_elements(
                    By.CSS_SELECTOR, 'article.msg[data-state="done"]')) == n)
            driver.execute_script("document.getElementById('transcript').scrollTop = 0")  # from the start
            again = driver.find_elements(By.CSS_SELECTOR, "article.msg.user")[1]
            tokens = again.find_elements(By.CSS_SELECTOR, ".tok")
            ActionChains(driver).move_to_element(tokens[min(9, len(tokens) - 1)]).perform()
            wait.until(lambda d: d.find_element(By.ID, "tip").is_displayed())
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
        finally:
            driver.quit()
            server.stop()
    print(f"{args.out}: {args.out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
