"""Regenerate the report screenshots in docs/screenshots/ from the main job's report (the trained digits ViT).

By default runs the main job (``python -m examples.main_job``: 20 epochs of the digits ViT, test of the best
checkpoint, explainability report of the test set; about a CPU minute) into a temporary folder; ``--report`` takes
the report.html of a run instead. Opens the report in headless Chromium (selenium, Debian's chromium and
chromedriver) with a 1400 x 1000 viewport and saves five viewport screenshots:

    report_screen1.png        the report's first screen
    report_screen2.png        its second screen (one viewport down)
    explorer_head_view.png    the attention explorer, controls and head view, on a head whose attention is peaked
    explorer_model_view.png   the explorer's model view (layers x heads grid) with that head enlarged
    report_drilldown.png      the drill-down of a probe sample after a click on its row of the per-sample table

It also prints the report's size and its page height at this width.

    PYTHONPATH=. python scripts/screenshots.py [--report PATH/report.html] [--out docs/screenshots]
        [--layer L --head H] [--sample S]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WINDOW = (1400, 1000)
MAX_BYTES = 300 * 1024

# Mean normalised entropy (0: every query on one key, 1: uniform) of each (layer, head) of a probe sample, and the
# share of its queries whose strongest key is the most common strongest key (1: the head view is one fan of lines).
HEAD_SCORES = """
const api = window.lightningAttn, sample = arguments[0], out = [];
for (let layer = 0; layer < api.sites.length; layer++) {
  const heads = Number(/\\((\\d+) heads\\)/.exec(document.querySelector('#la-layer').options[layer].text)[1]);
  for (let head = 0; head < heads; head++) {
    const map = api.map(layer, head, sample);
    let entropy = 0;
    const counts = {};
    for (const row of map) {
      let h = 0, best = 0;
      row.forEach((w, k) => { if (w > 0) h -= w * Math.log(w); if (w > row[best]) best = k; });
      entropy += h / Math.log(row.length);
      counts[best] = (counts[best] || 0) + 1;
    }
    out.push({layer: layer, head: head, entropy: entropy / map.length,
              modal: Math.max(...Object.values(counts)) / map.length});
  }
}
return out;
"""


def run_main_job(root: Path) -> Path:
    """Run the main job with its outputs under ``root``; returns the report.html of its test set."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("MPLBACKEND", "Agg")
    command = [sys.executable, "-m", "examples.main_job", "--trainer.default_root_dir", str(root / "digits_vit")]
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    pages = sorted(root.glob("digits_vit/**/report/test/report.html"))
    if not pages:
        raise SystemExit(f"the main job wrote no report under {root}")
    return pages[-1]


def _shrink(path: Path) -> None:
    """Re-save ``path`` with a 256-colour palette if it is over MAX_BYTES (report pages have few colours)."""
    if path.stat().st_size <= MAX_BYTES:
        return
    from PIL import Image

    with Image.open(path) as image:
        buffer = io.BytesIO()
        image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(buffer, "PNG", optimize=True)
    path.write_bytes(buffer.getvalue())


def screenshots(page: Path, out: Path, profile: Path, layer=None, head=None, sample=None) -> list[Path]:
    """Save the five screenshots of ``page`` into ``out``; returns their paths."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=options)
    out.mkdir(parents=True, exist_ok=True)
    saved: list[Path] = []

    def shot(name: str) -> None:
        driver.execute_script("return new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        driver.save_screenshot(str(out / name))
        _shrink(out / name)
        saved.append(out / name)

    def scroll_to(selector: str, margin: int = 12) -> None:
        """Scroll so that the top of ``selector`` sits ``margin`` px below the top of the viewport."""
        driver.execute_script(
            "const r = document.querySelector(arguments[0]).getBoundingClientRect();"
            "window.scrollTo(0, window.scrollY + r.top - arguments[1]);",
            selector,
            margin,
        )

    try:
        # the window's own chrome takes part of --window-size: fix the viewport itself at 1400 x 1000
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False},
        )
        driver.get(page.as_uri())
        driver.set_script_timeout(60)
        driver.execute_async_script("const done = arguments[0]; window.lightningAttn.ready.then(() => done(true));")
        height = driver.execute_script("return document.documentElement.scrollHeight")
        print(f"{page}: {page.stat().st_size / 1024:.0f} KB, page height {height} px at {WINDOW[0]} px width")

        shot("report_screen1.png")
        driver.execute_script("window.scrollTo(0, window.innerHeight)")
        shot("report_screen2.png")

        api = driver.execute_script("const a = window.lightningAttn; return {samples: a.samples, epochs: a.epochs}")
        sample = api["samples"][0] if sample is None else sample
        if layer is None or head is None:
            # the most peaked head whose queries do not all look at one key (the head view would be a single fan)
            scores = driver.execute_script(HEAD_SCORES, sample)
            varied = [s for s in scores if s["modal"] < 0.9] or scores
            best = min(varied, key=lambda s: s["entropy"])
            layer, head = best["layer"], best["head"]
            print(
                f"explorer: layer {layer} head {head} of sample {sample} (mean normalised entropy "
                f"{best['entropy']:.2f}; most peaked of all heads {min(s['entropy'] for s in scores):.2f}, "
                f"most uniform {max(s['entropy'] for s in scores):.2f})"
            )
        choice = {"layer": layer, "head": head, "sample": sample, "epoch": api["epochs"][-1]}
        driver.execute_script("window.lightningAttn.select(arguments[0])", choice)
        scroll_to("#explorer", 12)
        shot("explorer_head_view.png")

        driver.find_element(By.CSS_SELECTOR, f'#la-grid canvas[data-layer="{layer}"][data-head="{head}"]').click()
        scroll_to(".explorer .views > div:nth-child(2)", 12)
        shot("explorer_model_view.png")

        # the probe samples are the table's first rows: sort it by sample, descending, and scroll its box to the
        # bottom so that the clicked row shows above the drill-down
        header = driver.find_element(By.XPATH, '//table[@id="samples"]/thead/tr/th[normalize-space()="sample"]')
        for _ in range(2):
            if header.get_attribute("data-sort") == "desc":
                break
            header.click()
        row = driver.find_element(By.CSS_SELECTOR, f'#samples tbody tr[data-sample="{sample}"]')
        driver.execute_script(
            "const box = arguments[0].closest('.scroll'); box.scrollTop = box.scrollHeight;"
            "arguments[0].scrollIntoView({block: 'nearest'})",
            row,
        )
        row.click()
        # the whole drill-down at the bottom of the viewport (its top at the top if it is taller than the viewport)
        driver.execute_script(
            "const r = document.querySelector('#drill').getBoundingClientRect(), y = window.scrollY;"
            "window.scrollTo(0, Math.min(y + r.bottom + 12 - window.innerHeight, y + r.top - 12));"
        )
        shot("report_drilldown.png")
    finally:
        driver.quit()
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, help="a report.html (default: run the main job and take its report)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--layer", type=int, help="explorer layer (default: chosen by its attention)")
    parser.add_argument("--head", type=int, help="explorer head (default: chosen by its attention)")
    parser.add_argument("--sample", type=int, help="probe sample of the explorer and the drill-down (default: first)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lightning-attn-screenshots-") as work:
        page = args.report.resolve() if args.report else run_main_job(Path(work))
        for path in screenshots(page, args.out, Path(work) / "chromium-profile", args.layer, args.head, args.sample):
            print(f"{path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
