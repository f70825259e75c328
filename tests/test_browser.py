"""The web interface in a real browser: Debian's headless Chromium driven by selenium + the system
chromedriver (nothing is downloaded; the network is not needed).

The app runs on a real HTTP server on 127.0.0.1 (a random port) in this process. Screenshots of every
page go to ``test-artifacts/web/`` (git-ignored); with ``FEDTENSOR_WRITE_DOCS=1`` they are also copied
to ``docs/web/`` for the README. Without Chromium these tests fail, unless ``FEDTENSOR_NO_BROWSER=1``
says to skip them.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = REPO / "test-artifacts" / "web"
DOCS = REPO / "docs" / "web"
SAMPLE = REPO / "examples" / "data" / "ct_head_uint8.nii.gz"
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,1000")


def _require_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401  (only whether it imports)
    except ImportError:
        missing.append("the selenium package (pip install -e '.[dev]')")
    if missing:
        if os.environ.get("FEDTENSOR_NO_BROWSER") == "1":
            pytest.skip(f"FEDTENSOR_NO_BROWSER=1 and missing: {', '.join(missing)}")
        pytest.fail(f"browser tests need {', '.join(missing)} (apt-get install -y chromium chromium-driver); "
                    "set FEDTENSOR_NO_BROWSER=1 to skip them", pytrace=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``(base_url, app)``: the real app on a real HTTP server (threaded, like ``fedtensor serve``)."""
    _require_browser()
    from werkzeug.serving import make_server

    from fedtensor.serve.app import create_app

    root = tmp_path_factory.mktemp("web")
    app = create_app(root / "data", config={"FEDTENSOR_WEB": True, "FEDTENSOR_WEB_TMP": str(root),
                                                "MAX_CONTENT_LENGTH": 64 << 20})
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_port}", app
    srv.shutdown()
    app.extensions["fedtensor_web"].close()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(server, downloads, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for f in CHROME_FLAGS:
        opts.add_argument(f)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False,
                                           "safebrowsing.enabled": False})
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager must not try the network
    driver = webdriver.Chrome(options=opts, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def screenshot(driver, name: str) -> Path:
    """A full-page PNG in test-artifacts/web (and docs/web with FEDTENSOR_WRITE_DOCS=1)."""
    import base64

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 8000), "scale": 1}})
    path = ARTIFACTS / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    if os.environ.get("FEDTENSOR_WRITE_DOCS") == "1":
        DOCS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS / path.name)
    return path


def wait_for(driver, css: str, timeout: float = 120.0):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(
        EC.presence_of_element_located((By.CSS_SELECTOR, css)))


def wait_file(directory: Path, suffix: str, timeout: float = 30.0) -> Path:
    end = time.time() + timeout
    while time.time() < end:
        done = [p for p in directory.iterdir() if p.name.endswith(suffix)]
        if done:
            return done[0]
        time.sleep(0.2)
    raise AssertionError(f"no *{suffix} downloaded into {directory}: {[p.name for p in directory.iterdir()]}")


def fill_form(driver, *, upload: Path | None = None, sample: str | None = None, mode: str, value: str | None):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    if upload is not None:
        driver.find_element(By.ID, "volume").send_keys(str(upload))
    if sample is not None:
        Select(driver.find_element(By.ID, "sample")).select_by_value(sample)
    driver.find_element(By.CSS_SELECTOR, f"input[name=mode][value={mode}]").click()
    if value is not None:
        box = driver.find_element(By.ID, "value")
        box.clear()
        box.send_keys(value)
    driver.find_element(By.ID, "compress-button").click()


def metric(driver, name: str) -> float:
    from selenium.webdriver.common.by import By

    return float(driver.find_element(By.ID, f"m-{name}").get_attribute("data-value"))


@pytest.fixture(scope="module")
def crop(tmp_path_factory) -> Path:
    """A 96×96×40 crop of the bundled CT head sample (same geometry), as a NIfTI file to upload."""
    from fedtensor.io import Volume, read_volume, write_volume

    v = read_volume(SAMPLE)
    path = tmp_path_factory.mktemp("upload") / "ct_head_crop.nii.gz"
    write_volume(Volume(v.data[40:136, 76:172, 9:49].copy(), v.spacing, v.affine), path)
    return path


def wait_images(driver) -> None:
    """Until every slice image has loaded (a decoded PNG has naturalWidth > 0)."""
    js = "return [...document.querySelectorAll('img.slice')].every(i => i.complete && i.naturalWidth > 0)"
    end = time.time() + 30
    while time.time() < end and not driver.execute_script(js):
        time.sleep(0.2)
    assert driver.execute_script("return document.querySelectorAll('img.slice').length") == 9
    assert driver.execute_script(js), "a slice image did not load"


def check_result(driver, downloads: Path, original, *, rivals: set[str]) -> dict:
    """Read the figures off the result page, check the viewer and the chart, download both files and
    check that they decode to what the page reported; return the figures."""
    from selenium.webdriver.common.by import By

    from fedtensor.codec import decompress, read_info
    from fedtensor.io import read_volume
    from fedtensor.metrics import max_abs_error, psnr

    wait_for(driver, "#metrics", timeout=300)
    shown = {k: metric(driver, k) for k in ("psnr", "ssim", "max-error", "ftz-bytes", "bpv", "ratio", "encode-s")}
    assert 0 < shown["bpv"] < 8 and shown["ratio"] > 1 and 0.5 < shown["ssim"] <= 1 and shown["encode-s"] > 0
    assert abs(shown["ratio"] - original.data.nbytes / shown["ftz-bytes"]) < 1e-6 * shown["ratio"]

    wait_for(driver, "#viewer img.slice[src]")
    wait_images(driver)
    axial = ".view[data-axis='2']"
    before = driver.find_element(By.CSS_SELECTOR, f"{axial} img[data-kind=original]").get_attribute("src")
    slider = driver.find_element(By.CSS_SELECTOR, f"{axial} .slider")
    driver.execute_script("arguments[0].value = 5; arguments[0].dispatchEvent(new Event('input'))", slider)
    after = driver.find_element(By.CSS_SELECTOR, f"{axial} img[data-kind=original]").get_attribute("src")
    assert before != after and "/original/2/5.png" in after
    assert driver.find_element(By.CSS_SELECTOR, f"{axial} .slice-no").text == "6"
    # a window/level preset redraws every view with its centre and width
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "preset")).select_by_visible_text("CT bone")
    assert driver.find_element(By.ID, "wl-center").get_attribute("value") == "400"
    assert driver.find_element(By.ID, "wl-width").get_attribute("value") == "1800"
    srcs = [i.get_attribute("src") for i in driver.find_elements(By.CSS_SELECTOR, "img.slice")]
    assert all("c=400&w=1800" in u for u in srcs)
    Select(driver.find_element(By.ID, "preset")).select_by_index(0)
    driver.execute_script("arguments[0].value = arguments[0].max / 2; arguments[0].dispatchEvent(new Event('input'))",
                          slider)
    wait_images(driver)

    # the size chart against the rivals at the same PSNR arrives by itself
    wait_for(driver, "#compare-table", timeout=300)
    rows = driver.find_elements(By.CSS_SELECTOR, "#compare-table tr[data-codec]")
    assert {r.get_attribute("data-codec") for r in rows} == rivals
    for r in rows:
        assert int(r.find_element(By.CSS_SELECTOR, "td[data-bytes]").get_attribute("data-bytes")) > 0
    assert len(driver.find_elements(By.CSS_SELECTOR, "#compare-chart svg rect")) == len(rivals) + 1

    for p in downloads.iterdir():
        p.unlink()
    driver.find_element(By.ID, "download-ftz").click()
    blob = wait_file(downloads, ".ftz").read_bytes()
    assert len(blob) == shown["ftz-bytes"] and abs(read_info(blob)["bits_per_voxel"] - shown["bpv"]) < 1e-3
    decoded = decompress(blob)
    assert max_abs_error(original.data, decoded.data) == shown["max-error"]
    assert abs(psnr(original.data, decoded.data) - shown["psnr"]) < 1e-6
    driver.find_element(By.ID, "download-nifti").click()
    assert np.array_equal(read_volume(wait_file(downloads, ".decoded.nii.gz")).data, decoded.data)
    return shown


def test_upload_compress_read_metrics_download_decode(server, browser, downloads, crop):
    """Upload a real CT crop, compress it to a max error of 2, read the figures off the page, see the
    slices and the size chart against JPEG2000, DWT and PCA, download both files and decode them."""
    from selenium.webdriver.common.by import By

    from fedtensor.io import read_volume

    base, _ = server
    browser.get(base + "/")
    assert browser.find_element(By.NAME, "csrf_token").get_attribute("value")
    screenshot(browser, "compress-form")
    fill_form(browser, upload=crop, mode="max_error", value="2")
    shown = check_result(browser, downloads, read_volume(crop), rivals={"jpeg2000", "dwt", "pca"})
    assert shown["max-error"] <= 2 and 35 < shown["psnr"] < 80
    screenshot(browser, "result-upload")


@pytest.mark.slow
def test_bundled_sample_at_target_psnr(server, browser, downloads):
    """The bundled sample picked from the list at 40 dB: the paper's setting; the README screenshots."""
    from fedtensor.io import read_volume

    base, _ = server
    browser.get(base + "/")
    fill_form(browser, sample=SAMPLE.name, mode="psnr", value="40")
    shown = check_result(browser, downloads, read_volume(SAMPLE), rivals={"jpeg2000", "dwt", "pca"})
    assert 40 <= shown["psnr"] < 40.2
    screenshot(browser, "result")


def test_bad_upload_shows_the_error(server, browser, tmp_path):
    base, _ = server
    bad = tmp_path / "notes.nii.gz"
    bad.write_bytes(b"\x1f\x8b" + b"this is not a gzip stream at all" * 10)
    browser.get(base + "/")
    fill_form(browser, upload=bad, mode="psnr", value="45")
    msg = wait_for(browser, "#error-message", timeout=30).text
    assert "cannot read NIfTI file notes.nii.gz" in msg
    assert "Traceback" not in browser.page_source and "/tmp" not in msg
    screenshot(browser, "bad-upload")


def test_federation_page(server, browser, tmp_path):
    """Published global versions appear with their hashes, rounds, clients and loss curve."""
    from selenium.webdriver.common.by import By

    from fedtensor.nn import NetConfig, new_net, save_model
    from fedtensor.nn.checkpoint import read_model_bytes

    base, app = server
    store = app.extensions["fedtensor_store"]
    infos = []
    for r, (loss, val) in enumerate([(0.9, 1.0), (0.6, 0.75), (0.45, 0.6), (0.4, 0.58)], start=1):
        d = tmp_path / f"m{r}"
        save_model(new_net(NetConfig(channels=(8, 16), cond_hidden=8), seed=r), d)
        data, _, manifest = read_model_bytes(d)
        clients = ["hospital-a", "hospital-b", "clinic-c"][: 2 + r % 2]
        infos.append(store.publish(data, manifest, {"round": r, "clients": clients, "n_clients": len(clients),
                                                     "loss": loss, "val_loss": val}))
    browser.get(base + "/federation")
    rows = browser.find_elements(By.CSS_SELECTOR, "#versions tr[data-version]")
    assert [int(r.get_attribute("data-version")) for r in rows] == [4, 3, 2, 1]
    text = browser.find_element(By.ID, "versions").text
    for info in infos:
        assert info.sha256 in text
    assert "hospital-a, hospital-b, clinic-c" in text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#loss-curves svg polyline")) == 2
    screenshot(browser, "federation")
    # the compression form now offers the published versions as restoration models
    browser.get(base + "/")
    options = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#model option")]
    assert options == ["", "4", "3", "2", "1"]
