"""A real Chromium for the viewer's tests, driven by Playwright (importable as `browser`).

Where no Chromium (or no Playwright) is found the tests skip with a reason that says how to
install it; with ATLAS_REQUIRE_BROWSER=1 (set by .ci/run) that skip is a failure instead, so CI
always runs them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

INSTALL = ("install Chromium (Debian: `apt-get install -y chromium`) and Playwright for Python "
           "(`pip install playwright`, in the dev extra)")
SCREENSHOTS = Path(__file__).parent.parent / "data" / "test-screenshots"  # for a person to look at


def chromium_path() -> str | None:
    """The system Chromium, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def require_browser() -> str:
    """The Chromium to launch; skips (or fails under ATLAS_REQUIRE_BROWSER=1) when it is missing."""
    problem = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problem = "Playwright for Python is not installed"
    path = chromium_path()
    if problem is None and path is None:
        problem = "no Chromium found on PATH"
    if problem is not None:
        message = f"{problem}; {INSTALL}"
        if os.environ.get("ATLAS_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path  # type: ignore[return-value]
