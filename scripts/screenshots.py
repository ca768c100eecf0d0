"""Regenerate the report screenshots in docs/screenshots/ from a short digits ViT run (a few CPU minutes).

Fits the digits example for three short epochs with an ExplainabilityReport on validation (so the last validation
report's explorer has an epoch slider over the three epochs), then opens that report in headless Chromium (selenium,
Debian's chromium and chromedriver) and saves: the first screen, the second screen (one viewport down), the
explorer's head view and model view, and the drill-down of a probe sample after a click on its row.

    PYTHONPATH=. python scripts/screenshots.py [--out docs/screenshots]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import lightning.pytorch as pl

from examples.digits_vit import DigitsDataModule, DigitsViT
from lightning_attn import ExplainabilityReport

WINDOW = (1400, 1000)


def digits_report(root: Path) -> Path:
    """The last validation report of a short digits ViT fit (three epochs of 20 batches)."""
    pl.seed_everything(0, verbose=False)
    report = ExplainabilityReport(stages=("validate",), probe_samples=3, save_dir=str(root / "outputs"))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=3,
        limit_train_batches=20,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(root),
        callbacks=[report],
    )
    trainer.fit(DigitsViT(), datamodule=DigitsDataModule())
    return Path(report.results["val"]["directory"]) / "report.html"


def screenshots(page: Path, out: Path, profile: Path) -> list[Path]:
    """Save the five screenshots of ``page`` into ``out``; returns their paths."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(argument)
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=options)
    out.mkdir(parents=True, exist_ok=True)
    saved: list[Path] = []

    def element(selector: str, name: str) -> None:
        target = driver.find_element(By.CSS_SELECTOR, selector)
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", target)
        target.screenshot(str(out / name))
        saved.append(out / name)

    try:
        driver.set_window_size(*WINDOW)
        driver.get(page.as_uri())
        driver.set_script_timeout(30)
        driver.execute_async_script("const done = arguments[0]; window.lightningAttn.ready.then(() => done(true));")
        driver.save_screenshot(str(out / "report_screen1.png"))
        saved.append(out / "report_screen1.png")
        driver.execute_script("window.scrollTo(0, window.innerHeight)")
        driver.save_screenshot(str(out / "report_screen2.png"))
        saved.append(out / "report_screen2.png")
        driver.execute_script("window.lightningAttn.select({layer: 2, head: 1, sample: 1})")
        element(".headview", "explorer_head_view.png")
        driver.find_element(By.CSS_SELECTOR, '#la-grid canvas[data-layer="2"][data-head="1"]').click()
        element(".views > div:nth-child(2)", "explorer_model_view.png")
        row = driver.find_element(By.CSS_SELECTOR, '#samples tbody tr[data-sample="1"]')
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", row)
        row.click()
        element("#drilldown", "report_drilldown.png")
    finally:
        driver.quit()
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lightning-attn-screenshots-") as work:
        page = digits_report(Path(work))
        for path in screenshots(page, args.out, Path(work) / "chromium-profile"):
            print(f"{path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
