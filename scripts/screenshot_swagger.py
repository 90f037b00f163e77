"""Check the service's Swagger UI in a real headless Chromium: screenshot `/docs` and do one "Try it out" round trip.

Needs Debian's browser and driver (`apt-get install -y chromium chromium-driver`) and `pip install selenium`.

Usage:
    python scripts/screenshot_swagger.py --model DIR [--output docs/figures/swagger.png]
    python scripts/screenshot_swagger.py --url http://127.0.0.1:8000 --output swagger.png   # a running server
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1400",
]


def find_browser() -> tuple[str, str] | None:
    """(chromium binary, chromedriver) when both are installed, else None."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def check_swagger(base_url: str, screenshot: str | os.PathLike, texts: list[str] | None = None) -> dict:
    """Open `{base_url}/docs`, save a screenshot, then run POST /embed through "Try it out" -> "Execute".

    Returns:
        `{"title": page title, "operations": [shown operations], "status": HTTP status shown by Swagger,
        "response": the JSON body Swagger received}`.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    found = find_browser()
    if found is None:
        raise RuntimeError("chromium and chromedriver are needed: apt-get install -y chromium chromium-driver")
    browser, driver_path = found
    profile = tempfile.mkdtemp(prefix="mtl-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    # The explicit driver path keeps Selenium Manager from trying to download one.
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(f"{base_url}/docs")
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".opblock")))
        operations = [el.text.replace("\n", " ") for el in driver.find_elements(By.CSS_SELECTOR, ".opblock-summary")]
        Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(screenshot))

        # Try it out: expand POST /embed, edit the body, execute, read the response Swagger shows.
        block = driver.find_element(By.ID, "operations-default-embed_embed_post")
        block.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
        wait.until(lambda d: block.find_elements(By.CSS_SELECTOR, ".try-out__btn"))[0].click()
        body = wait.until(lambda d: block.find_elements(By.CSS_SELECTOR, "textarea.body-param__text"))[0]
        body.clear()
        body.send_keys(json.dumps({"texts": texts or ["Swagger says hello."]}))
        block.find_element(By.CSS_SELECTOR, ".execute").click()
        status = wait.until(
            lambda d: block.find_elements(By.CSS_SELECTOR, ".live-responses-table tbody .response-col_status")
        )[0].text.strip()
        text = block.find_element(By.CSS_SELECTOR, ".live-responses-table .microlight").text
        return {"title": driver.title, "operations": operations, "status": status, "response": json.loads(text)}
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder to serve (default: the default MiniLM with a demo head)")
    parser.add_argument("--url", help="use this running server instead of starting one")
    parser.add_argument("--output", default=str(ROOT / "docs" / "figures" / "swagger.png"))
    args = parser.parse_args(argv)
    if args.url:
        result = check_swagger(args.url.rstrip("/"), args.output)
    else:
        import uvicorn

        from modeling_mtl import MultiTaskModel
        from multitask_st import default_backbone
        from multitask_st.service import create_app

        if args.model:
            model = MultiTaskModel.from_pretrained(args.model)
        else:  # untrained demo heads: the page shows the endpoints, the embeddings are the pretrained ones
            model = MultiTaskModel.from_backbone(
                default_backbone(),
                tasks=[{"name": "sentiment", "type": "classification", "labels": ["negative", "positive"]}],
            )
            model.config.name_or_path = "sentence-transformers/all-MiniLM-L6-v2 + untrained demo head"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(model), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        try:
            result = check_swagger(f"http://127.0.0.1:{port}", args.output)
        finally:
            server.should_exit = True
            thread.join(timeout=10)
    vector = result["response"]["embeddings"][0]
    print(
        f"screenshot: {args.output}\noperations: {result['operations']}\n"
        f"try-it-out POST /embed -> HTTP {result['status']}, dimension {len(vector)}"
    )
    return 0 if result["status"] == "200" else 1


if __name__ == "__main__":
    sys.exit(main())
