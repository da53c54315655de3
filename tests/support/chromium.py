"""Headless Chromium (Debian's `chromium`) for page tests: screenshots and the DOM after scripts ran.

Each call starts a fresh browser with its own throw-away profile and no network features, so
nothing is fetched and nothing persists between calls.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM = shutil.which("chromium")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--mute-audio")


def chromium(page: Path, *args: str, fragment: str = "", timeout: float = 90) -> subprocess.CompletedProcess:
    """Run Chromium on ``page`` (``#fragment`` appended to its file URL) with more ``args``."""
    if CHROMIUM is None:
        raise RuntimeError("chromium is not installed (Debian package `chromium`; see scripts/setup.sh)")
    url = Path(page).resolve().as_uri() + (f"#{fragment}" if fragment else "")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, url],
                              capture_output=True, text=True, timeout=timeout, check=True)


def screenshot(page: Path, out: Path, width: int = 1280, height: int = 1400, fragment: str = "") -> Path:
    """A PNG of the page's first ``width`` x ``height`` pixels."""
    chromium(page, f"--screenshot={out}", f"--window-size={width},{height}", fragment=fragment)
    return out


def dom(page: Path, fragment: str = "", width: int = 1280, height: int = 1400) -> str:
    """The page's DOM after its scripts ran (``--dump-dom``), as HTML text."""
    return chromium(page, "--dump-dom", f"--window-size={width},{height}", fragment=fragment).stdout
