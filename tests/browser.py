"""Headless Chromium for the UI checks: Debian's chromium driven by its chromedriver, both on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.processes import free_port, stop

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
needs_chromium = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
    reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver): "
           "`make system-deps` installs them (as root)")


@contextmanager
def chromium(profile: Path) -> Iterator:
    """Debian's chromedriver on a free port driving headless Chromium; both stopped by chromedriver's pid."""
    from selenium import webdriver

    port = free_port()
    log = open(profile.parent / "chromedriver.log", "w")
    driver_proc = subprocess.Popen([str(CHROMEDRIVER), f"--port={port}"], stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2).close()
                break
            except OSError:
                assert driver_proc.poll() is None and time.monotonic() < deadline, "chromedriver did not start"
                time.sleep(0.2)
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     f"--user-data-dir={profile}", "--window-size=1400,1400"):
            options.add_argument(flag)
        driver = webdriver.Remote(command_executor=f"http://127.0.0.1:{port}", options=options)
        try:
            yield driver
        finally:
            driver.quit()
    finally:
        stop(driver_proc)
        log.close()


