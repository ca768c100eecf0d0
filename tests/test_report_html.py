"""The HTML report in a real headless Chromium: it renders, its images load, the per-sample table has one row per
test sample and sorts; a screenshot is saved under test-artifacts/."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from report_helpers import shared_report

CHROMIUM = next(
    (shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None
)
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no headless Chromium on this machine (Debian: apt-get install -y chromium)"
)


class _Checks(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.attrs: dict[str, str | None] | None = None
        self.rows = 0
        self._in_samples = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "div" and values.get("id") == "checks":
            self.attrs = values
        if tag == "table" and values.get("id") == "samples":
            self._in_samples = True
        if tag == "tr" and self._in_samples:
            self.rows += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_samples = False


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return shared_report(str(tmp_path_factory.getbasetemp()))


def test_report_renders_in_headless_chromium(shared: dict, tmp_path: Path) -> None:
    page = shared["dir"] / "report.html"
    result = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", page.as_uri() + "#selftest")
    assert result.returncode == 0, result.stderr[-2000:]
    parser = _Checks()
    parser.feed(result.stdout)
    checks = parser.attrs
    assert checks is not None, "no #checks element in the rendered DOM"
    images = int(checks["data-images"] or 0)
    assert images >= 8
    assert checks["data-images-loaded"] == str(images), checks
    assert checks["data-rows"] == str(shared["num_samples"]) == checks["data-expected-rows"], checks
    assert checks["data-sort"] == "ok", checks
    assert checks["data-status"] == "ok", checks
    assert parser.rows == shared["num_samples"] + 1  # header row + one per sample

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report_html.png"
    shot.unlink(missing_ok=True)
    result = chromium(
        tmp_path,
        "--hide-scrollbars",
        "--window-size=1280,2400",
        "--virtual-time-budget=3000",
        f"--screenshot={shot}",
        page.as_uri(),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.is_file() and shot.stat().st_size > 20_000
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1280, 2400)
        colors = image.convert("RGB").resize((64, 120)).getcolors(64 * 120)
        assert colors is not None and len(colors) > 20  # a rendered page, not a blank one
