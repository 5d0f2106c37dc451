"""The try-it page at the gateway's `/` (and the server's), used as a person uses it, in a real
headless Chromium: pick the model, upload a digit PNG, read the answer; a file that is not an image
gets a readable error on the page. Screenshots go to the test's output folder (printed), and to
docs/images/ with CAFFESERVE_DOC_SCREENSHOTS=1 (how docs/try-it.md's picture was made)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

from caffe_testing.digits import DIGITS_DIR, digits_data
from caffe_testing.gateway import GatewayProcess, static
from caffe_testing.servers import REPO, ServerProcess, http

IMAGES, LABELS = digits_data.held_out()
DOC_IMAGE = REPO / "docs" / "images" / "try-it.png"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with ServerProcess(DIGITS_DIR / "server.yaml") as server, \
            GatewayProcess("--static", static("digits", server)) as gateway:
        yield server, gateway


def screenshot(browser, out: Path, name: str) -> Path:
    path = out / name
    browser.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def wait_for_text(browser, element_id: str, timeout: float = 20.0) -> str:
    WebDriverWait(browser, timeout).until(
        lambda b: b.find_element(By.ID, element_id).is_displayed() and b.find_element(By.ID, element_id).text.strip())
    return browser.find_element(By.ID, element_id).text


def test_the_page_is_one_static_file_with_its_own_script(served):
    server, gateway = served
    for url in (gateway.url, server.url):
        status, headers, body = http("GET", url + "/")
        headers = {k.lower(): v for k, v in headers.items()}
        assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
        assert b"<script src" not in body and b"https://" not in body and b"http://" not in body  # no CDN
        assert "default-src 'self'" in headers["content-security-policy"]


@pytest.mark.parametrize("where", ["gateway", "server"])
def test_upload_a_digit_and_see_it_recognised(served, browser, tmp_path, where):
    server, gateway = served
    url = (gateway if where == "gateway" else server).url
    i = next(k for k in range(len(LABELS)) if LABELS[k] == 7)
    png = tmp_path / "digit.png"
    png.write_bytes(digits_data.render_png(IMAGES[i], 64))

    browser.get(url + "/")
    WebDriverWait(browser, 20).until(ec.text_to_be_present_in_element((By.ID, "meta"), "backend"))
    assert Select(browser.find_element(By.ID, "model")).first_selected_option.text == "digits"
    browser.find_element(By.ID, "file").send_keys(str(png))
    assert wait_for_text(browser, "top1") == "7"
    rows = [r.text.split() for r in browser.find_elements(By.CSS_SELECTOR, "#top5 tr")]
    assert len(rows) == 5 and rows[0][0] == "7" and float(rows[0][1]) > 0.9  # label, score
    assert [float(r[1]) for r in rows] == sorted((float(r[1]) for r in rows), reverse=True)
    facts = browser.find_element(By.ID, "facts").text
    assert " ms round trip" in facts and ("backend pycaffe" in facts or "backend onnxruntime" in facts), facts
    assert not browser.find_element(By.ID, "error").is_displayed()
    shot = screenshot(browser, tmp_path, f"try-it-{where}.png")
    if where == "gateway" and os.environ.get("CAFFESERVE_DOC_SCREENSHOTS") == "1":
        DOC_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        DOC_IMAGE.write_bytes(shot.read_bytes())


def test_a_bad_file_gives_a_readable_error_on_the_page(served, browser, tmp_path):
    _, gateway = served
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image\n")
    browser.get(gateway.url + "/")
    WebDriverWait(browser, 20).until(ec.text_to_be_present_in_element((By.ID, "meta"), "backend"))
    browser.find_element(By.ID, "file").send_keys(str(bad))
    error = wait_for_text(browser, "error")
    assert error == ("400: input 'data': cannot decode image: not an image format the server reads "
                     "(JPEG, PNG, BMP, GIF, TIFF, WebP, ...)"), error
    assert not browser.find_element(By.ID, "result").is_displayed()
    screenshot(browser, tmp_path, "try-it-error.png")


def test_paste_a_json_tensor(served, browser, tmp_path):
    _, gateway = served
    i = next(k for k in range(len(LABELS)) if LABELS[k] == 3)
    blob = digits_data.to_blob(IMAGES[i:i + 1]).ravel().tolist()
    browser.get(gateway.url + "/")
    WebDriverWait(browser, 20).until(ec.text_to_be_present_in_element((By.ID, "meta"), "backend"))
    area = browser.find_element(By.ID, "tensor")
    browser.execute_script("arguments[0].value = arguments[1];", area, str([round(x, 5) for x in blob]))
    browser.find_element(By.ID, "run").click()
    assert wait_for_text(browser, "top1") == "3"
    browser.execute_script("arguments[0].value = '[1, 2,';", area)
    browser.find_element(By.ID, "run").click()
    assert wait_for_text(browser, "error").startswith("the tensor is not valid JSON")
