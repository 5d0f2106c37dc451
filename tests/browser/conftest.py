"""The browser tests' fixture: Debian's headless Chromium, driven by selenium through Debian's chromedriver."""

from __future__ import annotations

import shutil

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-sync",
         "--disable-component-update", "--disable-default-apps", "--metrics-recording-only", "--mute-audio",
         "--window-size=1100,720", "--force-device-scale-factor=1"]


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert shutil.which("chromium") and shutil.which("chromedriver"), \
        ("Chromium and chromedriver come from Debian (scripts/system/debian-packages.txt): "
         "bash scripts/system/setup_system.sh")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    # the driver named explicitly: selenium never looks for (or downloads) one of its own
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
