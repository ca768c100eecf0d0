"""The report page and its attention explorer in a real headless Chromium (selenium + Debian's chromium and
chromedriver): the explorer draws the captured maps (against MultiheadAttention's own weights), hovering a token
keeps only its lines, a row click opens that sample's drill-down, the filters filter, no console errors; plus the
explorer's payload (exact round trip, quantization bound, size for a BERT-base model). Screenshots go to
test-artifacts/."""

from __future__ import annotations

import base64
import json
import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import trainer_options
from report_helpers import TinyClassifier, TinyData, make_samples

from lightning_attn import build_report
from lightning_attn.report.explorer import explorer_data, write_explorer
from lightning_attn.report.page_data import input_view

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no chromium/chromedriver on this machine (Debian: apt-get install -y chromium chromium-driver)",
)
NUM_TEST, BATCH, PROBES = 24, 8, 3


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _unpack(data: dict) -> np.ndarray:
    raw = zlib.decompress(base64.b64decode(data["data"]))
    if data["encoding"] == "float32":
        return np.frombuffer(raw, dtype="<f4")
    return np.frombuffer(raw, dtype=np.uint8) / data["levels"]


def test_payload_round_trip_exact_and_quantized() -> None:
    rng = np.random.default_rng(0)
    maps = {
        3: {s: {"l0": _softmax(rng.normal(size=(2, 5, 5))), "x": _softmax(rng.normal(size=(2, 5, 3)))} for s in (4, 1)}
    }
    data = explorer_data(maps, tokens={1: list("abcde")})
    assert data["encoding"] == "float32" and [s["id"] for s in data["samples"]] == [1, 4]
    assert [s["name"] for s in data["sites"]] == ["l0", "x"] and data["samples"][0]["tokens"] == list("abcde")
    flat = _unpack(data)
    for c in data["chunks"]:
        sample, site = data["samples"][c["s"]]["id"], data["sites"][c["l"]]["name"]
        got = flat[c["o"] : c["o"] + c["h"] * c["q"] * c["k"]].reshape(c["h"], c["q"], c["k"])
        np.testing.assert_array_equal(got, maps[3][sample][site].astype(np.float32))
    quantized = explorer_data(maps, max_exact_values=10)
    assert quantized["encoding"] == "uint8" and quantized["levels"] == 255
    reference = np.concatenate([maps[3][s][site].reshape(-1) for s in (1, 4) for site in ("l0", "x")])
    assert np.abs(_unpack(quantized) - reference).max() <= 0.5 / 255 + 1e-9


def test_bert_base_explorer_stays_under_8_mb(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    sites = [f"bert.encoder.layer.{layer}.attention.self" for layer in range(12)]
    maps = {0: {s: {site: _softmax(2 * rng.normal(size=(12, 128, 128))) for site in sites} for s in range(4)}}
    tokens = {s: [f"tok{i}" for i in range(128)] for s in range(4)}
    page = write_explorer(tmp_path / "explorer.html", explorer_data(maps, tokens=tokens))
    assert page.stat().st_size < 8_000_000
    # incompressible weights (uniform noise) fall back to coarser steps and stay within the budget too
    noise = {0: {s: {site: rng.uniform(size=(12, 128, 128)) for site in sites} for s in range(4)}}
    data = explorer_data(noise)
    assert data["levels"] < 255
    assert write_explorer(tmp_path / "noise.html", data).stat().st_size < 8_000_000


def test_report_page_is_a_document_not_a_dump(report: dict) -> None:
    out, document = report["dir"], report["json"]
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "explorer.html" in document["files"] and (out / "explorer.html").stat().st_size > 1000
    assert 'href="report.json"' in page and "sections." not in page.replace("sections.calibration", "")
    markup = re.sub(r"<script.*?</script>|<style>.*?</style>", "", page, flags=re.S)
    assert "type_scores" not in markup and "[0]." not in markup  # no flattened JSON paths
    order = [page.index(f'id="{s}"') for s in ("overview", "per-sample", "drill", "calibration", "heads")]
    order += [page.index(f'id="{s}"') for s in ("attention", "explorer", "provenance")]
    assert order == sorted(order)


def test_inputs_are_drawn_as_what_they_are() -> None:
    rng = np.random.default_rng(0)
    gray = input_view("x", rng.uniform(size=(1, 8, 8)), None)
    assert gray["kind"] == "image" and (gray["channels"], gray["height"], gray["width"]) == (1, 8, 8)
    assert min(gray["values"]) == 0.0 and max(gray["values"]) == 1.0  # min-max scaled
    rgb = input_view("x", rng.uniform(size=(32, 32, 3)), None)  # channels last: moved first
    assert rgb["kind"] == "image" and rgb["channels"] == 3 and len(rgb["values"]) == 3 * 32 * 32
    big = input_view("x", rng.uniform(size=(3, 512, 512)), None)
    assert big["kind"] == "image" and len(big["values"]) <= 64 * 64 * 3 * 4 and "every" in big["note"]
    values = rng.normal(size=(20, 5))
    series = input_view("a", values, [f"f{i}" for i in range(5)])
    assert series["kind"] == "series" and series["features"] == [f"f{i}" for i in range(5)] and series["length"] == 20
    np.testing.assert_allclose(series["values"][2], values[:, 2], atol=1e-6)  # one line per feature
    assert input_view("v", rng.normal(size=7), None)["kind"] == "series"


def test_probe_maps_beyond_the_budget_are_left_out_with_a_note(tmp_path: Path, monkeypatch) -> None:
    from lightning_attn.report import run as report_run

    per_sample = 2 * 4 * 6 * 6 + 2 * 4 * 6 * 4  # two 6x6 self-attention sites, two 6x4 cross ones, 4 heads
    monkeypatch.setattr(report_run, "MAX_PROBE_MAP_VALUES", per_sample + 1)
    torch.manual_seed(0)
    out = build_report(
        TinyClassifier(num_heads=4),
        TinyData(num_test=8, batch_size=8).test_dataloader(),
        tmp_path / "r",
        accelerator="cpu",
        progress=False,
        figures=False,
        probe_samples=2,
    )
    notes = json.loads((out / "report.json").read_text())["notes"]
    assert any(n.startswith("attention maps of probe sample 1 and later") for n in notes), notes
    page = (out / "explorer.html").read_text(encoding="utf-8")
    data = json.loads(re.search(r'id="la-explorer-data">(.*?)</script>', page, flags=re.S).group(1))
    assert [s["id"] for s in data["samples"]] == [0] and _unpack(data).size == per_sample


def test_map_history_keeps_earlier_epochs_spread_within_its_budget() -> None:
    from types import SimpleNamespace

    from lightning_attn.report.map_history import ProbeMapHistory

    history = ProbeMapHistory(budget=5 * 8)  # five epochs of one 2 x 2 x 2 map
    for epoch in range(7):
        history.add(SimpleNamespace(key="val", epoch=epoch, probe_maps={0: {"l": np.full((2, 2, 2), epoch)}}))
    kept = history.earlier("val", 99)
    assert sorted(kept) == [0, 2, 4, 5, 6] and sorted(history.earlier("val", 4)) == [0, 2]
    assert history.earlier("test", 99) == {} and kept[4][0]["l"][0, 0, 0] == 4


# -- the browser ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.manual_seed(0)
    model = TinyClassifier(num_heads=4).eval()
    out = build_report(
        model,
        TinyData(num_test=NUM_TEST, batch_size=BATCH).test_dataloader(),
        tmp_path_factory.mktemp("explorer") / "report",
        accelerator="cpu",
        progress=False,
        probe_samples=PROBES,
        class_names=["low", "mid", "high"],
        feature_names={"a": [f"a{i}" for i in range(5)], "b": ["b0", "b1", "b2"]},
    )
    return {"dir": out, "model": model, "json": json.loads((out / "report.json").read_text())}


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(argument)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield browser
    browser.quit()


def _ready(driver) -> None:
    driver.set_script_timeout(20)
    driver.execute_async_script("const done = arguments[0]; window.lightningAttn.ready.then(() => done(true));")


def _reference_maps(model: TinyClassifier, sample: int, split: int = 2) -> dict[str, np.ndarray]:
    """Every attention map of sample ``sample`` of TinyData's test split (``split=1``: validation) from
    MultiheadAttention itself (need_weights, per head)."""
    data = make_samples(NUM_TEST, TinyData().seed + split)[sample]
    a, b = data["a"][None], data["b"][None]
    maps = {}
    with torch.no_grad():
        h = model.embed_a(a)
        for index, layer in enumerate(model.encoder.layers):
            maps[f"encoder.layers.{index}.self_attn"] = layer.self_attn(h, h, h, average_attn_weights=False)[1]
            h = layer(h)
        hb = model.embed_b(b)
        maps["cross_ab"] = model.cross_ab(h, hb, hb, average_attn_weights=False)[1]
        maps["cross_ba"] = model.cross_ba(hb, h, h, average_attn_weights=False)[1]
    return {site: m[0].double().numpy() for site, m in maps.items()}


def _shot(element_or_driver, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    path.unlink(missing_ok=True)
    if hasattr(element_or_driver, "screenshot"):  # an element: all of it in the window first
        element_or_driver.parent.execute_script("arguments[0].scrollIntoView()", element_or_driver)
        element_or_driver.screenshot(str(path))
    else:
        element_or_driver.save_screenshot(str(path))
    assert path.stat().st_size > 5_000


@needs_browser
def test_explorer_and_drilldown_in_chromium(report: dict, driver) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver.get((report["dir"] / "report.html").as_uri())
    _ready(driver)
    _shot(driver, "report_screen1.png")
    driver.execute_script("window.scrollTo(0, window.innerHeight)")
    _shot(driver, "report_screen2.png")
    driver.set_window_size(1280, 1800)  # element screenshots need the whole element in the window

    # layer 2, head 3 of sample 1: the drawn weights are MultiheadAttention's own map
    sites = driver.execute_script("return window.lightningAttn.sites")
    assert len(sites) >= 3
    state = driver.execute_script("return window.lightningAttn.select({layer: 2, head: 3, sample: 1})")
    assert state["heads"] == [3] and state["sample"] == 1
    reference = _reference_maps(report["model"], 1)
    drawn = np.array(driver.execute_script("return window.lightningAttn.weights()"))
    assert drawn.shape == reference[sites[2]][3].shape
    assert np.abs(drawn - reference[sites[2]][3]).max() < 1e-6
    for layer, site in enumerate(sites):  # every site, every head: the explorer holds the captured maps
        for head in range(reference[site].shape[0]):
            got = np.array(driver.execute_script(f"return window.lightningAttn.map({layer}, {head}, 1)"))
            assert np.abs(got - reference[site][head]).max() < 1e-6, (site, head)
    heads = reference[sites[0]].shape[0]  # a head past the layer's count is an error, not another layer's rows
    outside = driver.execute_script(
        f"try {{ window.lightningAttn.map(0, {heads}, 1); return null; }} catch (e) {{ return e.name; }}"
    )
    assert outside == "RangeError"
    lines = driver.execute_script("return window.lightningAttn.drawnLines()")
    queries, keys = drawn.shape
    assert len(lines) == queries * keys and {line["head"] for line in lines} == {3}
    for line in lines:
        assert line["weight"] == pytest.approx(drawn[line["query"], line["key"]], abs=1e-7)
    explorer = driver.find_element(By.ID, "la-explorer")
    driver.execute_script("arguments[0].scrollIntoView()", explorer)
    _shot(driver.find_element(By.CSS_SELECTOR, ".headview"), "explorer_head_view.png")

    # hover query token 2: only its lines remain
    token = driver.find_elements(By.CSS_SELECTOR, "#la-left div")[2]
    ActionChains(driver).move_to_element(token).perform()
    hovered = driver.execute_script("return window.lightningAttn.drawnLines()")
    assert len(hovered) == keys and {line["query"] for line in hovered} == {2}
    ActionChains(driver).move_to_element(driver.find_element(By.TAG_NAME, "h1")).perform()
    assert len(driver.execute_script("return window.lightningAttn.drawnLines()")) == queries * keys

    # model view: a click on a cell selects that layer and head and enlarges it
    cell = driver.find_element(By.CSS_SELECTOR, '#la-grid canvas[data-layer="0"][data-head="1"]')
    cell.click()
    state = driver.execute_script("return window.lightningAttn.state()")
    assert state["layer"] == 0 and state["heads"] == [1]
    assert "head 1" in driver.find_element(By.ID, "la-big-title").text
    _shot(driver.find_element(By.CSS_SELECTOR, ".views > div:nth-child(2)"), "explorer_model_view.png")

    # a click on sample 1's row opens its drill-down: its values, its input as a line chart, its attention maps
    row = driver.find_element(By.CSS_SELECTOR, '#samples tbody tr[data-sample="1"]')
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", row)
    row.click()
    panel = driver.find_element(By.ID, "drilldown")
    assert panel.get_attribute("data-sample") == "1"
    assert panel.find_element(By.TAG_NAME, "h3").text.startswith("Sample 1")
    assert len(panel.find_elements(By.CSS_SELECTOR, 'svg[data-kind="series"]')) == 2  # inputs a and b
    driver.execute_script("return window.lightningAttn.ready")
    assert len(panel.find_elements(By.CSS_SELECTOR, 'canvas[data-kind="attention"]')) == len(sites)
    assert len(panel.find_elements(By.CSS_SELECTOR, 'canvas[data-kind="saliency"]')) == 2
    driver.execute_script("arguments[0].scrollIntoView()", panel)
    _shot(panel, "report_drilldown.png")
    last = driver.find_element(By.CSS_SELECTOR, f'#samples tbody tr[data-sample="{NUM_TEST - 1}"]')
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", last)
    last.click()
    assert panel.get_attribute("data-sample") == str(NUM_TEST - 1) and "Not a probe sample" in panel.text

    # filters: only wrong predictions, then one true class
    driver.find_element(By.ID, "f-wrong").click()
    visible = [r for r in driver.find_elements(By.CSS_SELECTOR, "#samples tbody tr") if r.is_displayed()]
    assert len(visible) == report["json"]["dataset"]["num_incorrect"]
    assert all(r.get_attribute("data-correct") == "0" for r in visible)

    errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []


@needs_browser
def test_standalone_explorer_epoch_slider(tmp_path: Path, driver) -> None:
    from selenium.webdriver.common.by import By

    rng = np.random.default_rng(1)
    maps = {e: {0: {"layer": _softmax(rng.normal(size=(2, 4, 4)))}} for e in (1, 5)}
    page = write_explorer(tmp_path / "explorer.html", explorer_data(maps, tokens={0: ["[CLS]", "a", "b", "[SEP]"]}))
    driver.get(page.as_uri())
    _ready(driver)
    slider = driver.find_element(By.ID, "la-epoch")
    assert slider.is_displayed() and driver.execute_script("return window.lightningAttn.state().epoch") == 5
    driver.execute_script("window.lightningAttn.select({epoch: 1, head: 1})")
    drawn = np.array(driver.execute_script("return window.lightningAttn.weights()"))
    assert np.abs(drawn - maps[1][0]["layer"][1]).max() < 1e-6
    labels = [d.text for d in driver.find_elements(By.CSS_SELECTOR, "#la-left div")]
    assert labels == ["[CLS]", "a", "b", "[SEP]"]
    assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []


@needs_browser
def test_validation_report_epoch_slider(tmp_path: Path, driver) -> None:
    """A validation report during fit shows its probes' maps of every validation epoch so far: each epoch draws the
    map of that epoch's weights."""
    import copy

    import lightning.pytorch as pl
    from selenium.webdriver.common.by import By

    from lightning_attn import ExplainabilityReport

    class Snapshots(pl.Callback):
        def __init__(self) -> None:
            self.models: dict[int, TinyClassifier] = {}

        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.models[trainer.current_epoch] = copy.deepcopy(pl_module).eval()

    torch.manual_seed(0)
    report, snapshots = ExplainabilityReport(stages=("validate",), probe_samples=2, figures=False), Snapshots()
    options = trainer_options(tmp_path, max_epochs=2, num_sanity_val_steps=0, callbacks=[report, snapshots])
    trainer = pl.Trainer(**options)
    trainer.fit(TinyClassifier(num_heads=4), datamodule=TinyData(num_train=32, num_test=NUM_TEST, batch_size=BATCH))
    driver.get((Path(report.results["val"]["directory"]) / "report.html").as_uri())
    _ready(driver)
    assert driver.execute_script("return window.lightningAttn.epochs") == [0, 1]
    assert driver.find_element(By.ID, "la-epoch").is_displayed()
    sites = driver.execute_script("return window.lightningAttn.sites")
    for epoch in (0, 1):
        reference = _reference_maps(snapshots.models[epoch], 1, split=1)
        state = driver.execute_script(
            f"return window.lightningAttn.select({{layer: 1, head: 2, sample: 1, epoch: {epoch}}})"
        )
        assert state["epoch"] == epoch and state["heads"] == [2]
        drawn = np.array(driver.execute_script("return window.lightningAttn.weights()"))
        assert np.abs(drawn - reference[sites[1]][2]).max() < 1e-6, epoch
    assert np.abs(drawn - _reference_maps(snapshots.models[0], 1, split=1)[sites[1]][2]).max() > 1e-4  # trained
    assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []


@pytest.mark.slow
@needs_browser
def test_image_and_text_probes_in_chromium(tmp_path: Path, driver) -> None:
    from selenium.webdriver.common.by import By
    from test_report_attribution import TinyText, TinyViT, _text_loader
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(1)
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    out = build_report(
        TinyViT().eval(),
        DataLoader(TensorDataset(images, torch.arange(6) % 3), batch_size=3),
        tmp_path / "image",
        probe_samples=2,
        figures=False,
        progress=False,
        accelerator="cpu",
    )
    driver.get((out / "report.html").as_uri())
    _ready(driver)
    row = driver.find_element(By.CSS_SELECTOR, '#samples tbody tr[data-sample="1"]')
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", row)
    row.click()
    canvas = driver.find_element(By.CSS_SELECTOR, '#drilldown canvas[data-kind="image"]')
    assert (canvas.get_attribute("width"), canvas.get_attribute("height")) == ("8", "8")
    pixel = driver.execute_script(
        "return Array.from(arguments[0].getContext('2d').getImageData(0, 0, 8, 8).data)", canvas
    )
    x = images[1, 0].double().numpy()
    expected = np.round(255 * (x - x.min()) / (x.max() - x.min()))
    assert np.abs(np.array(pixel[0::4]).reshape(8, 8) - expected).max() <= 1  # the input itself, grey levels
    assert driver.find_elements(By.CSS_SELECTOR, '#drilldown canvas[data-kind="saliency"]')  # saliency beside it
    _shot(driver.find_element(By.ID, "drilldown"), "report_drilldown_image.png")

    torch.manual_seed(0)
    out = build_report(
        TinyText().eval(),
        _text_loader(),
        tmp_path / "text",
        probe_samples=2,
        figures=False,
        progress=False,
        accelerator="cpu",
        id_to_token=lambda i: f"w{i}",
    )
    report = json.loads((out / "report.json").read_text())
    driver.get((out / "report.html").as_uri())
    _ready(driver)
    driver.execute_script("window.lightningAttn.select({layer: 0, head: 0, sample: 1})")
    tokens = report["saliency"]["probes"][1]["tokens"]["tokens"]
    labels = [d.get_attribute("title").split(": ", 1)[1] for d in driver.find_elements(By.CSS_SELECTOR, "#la-left div")]
    assert labels[: len(tokens)] == tokens
    row = driver.find_element(By.CSS_SELECTOR, '#samples tbody tr[data-sample="1"]')
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", row)
    row.click()
    shown = [s.text for s in driver.find_elements(By.CSS_SELECTOR, "#drilldown .dtok")]
    assert shown == tokens
    assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
