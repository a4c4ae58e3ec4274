"""The web labeler: in real headless Chromium (keyboard shortcuts, a reload, undo, the stored
file), and over HTTP (the token on a non-loopback address, several annotators, bad requests)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import pytest

from fastrlhf.feedback.labeler import WebLabeler, serve_web_labeler
from fastrlhf.feedback.store import PreferenceStore

pytest.importorskip("starlette", reason="the web labeler needs starlette and uvicorn (pip install 'fastrlhf[label]')")
pytest.importorskip("uvicorn", reason="the web labeler needs starlette and uvicorn (pip install 'fastrlhf[label]')")

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ITEMS = [("Prompt one?", "A1", "B1"), ("Prompt two?", "A2", "B2"), ("Prompt three?", "A3", "B3")]


def request(url: str, body: dict | None = None, *, headers: dict | None = None) -> tuple[int, dict | str]:
    data = None if body is None else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json"} if body is not None else {}
    req = urllib.request.Request(url, data=data, headers={**hdrs, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


@pytest.fixture
def browser(tmp_path, monkeypatch):
    """Headless Debian Chromium through its own chromedriver; selenium-manager (which would go
    online) is never run: the driver and browser paths are given and SE_OFFLINE is set."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
                    "apt-get install chromium chromium-driver (.ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")
    monkeypatch.setenv("SE_AVOID_STATS", "true")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def test_label_in_chromium_with_keys_reload_and_undo(tmp_path, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def screen(n_done: int, prompt: str | None) -> None:
        def ready(d):
            if d.find_element(By.ID, "progress").text != f"{n_done} / 3":
                return False
            if prompt is None:
                return d.find_element(By.ID, "finished").is_displayed()
            return d.find_element(By.ID, "prompt").text == prompt
        WebDriverWait(browser, 15).until(ready, f"expected {n_done} / 3 and {prompt!r}")

    def press(key: str) -> None:
        ActionChains(browser).send_keys(key).perform()

    path = tmp_path / "web.jsonl"
    store = PreferenceStore(path)
    with WebLabeler(store, ITEMS) as lab:
        assert lab.token is None and lab.url == f"http://127.0.0.1:{lab.port}/"
        browser.get(lab.url)
        browser.find_element(By.ID, "name").send_keys("wendy\n")
        screen(0, "Prompt one?")
        assert browser.find_element(By.ID, "c1").text == "B1"
        press("1")
        screen(1, "Prompt two?")
        press("2")
        screen(2, "Prompt three?")
        browser.refresh()  # the name is remembered; labeled items stay done
        screen(2, "Prompt three?")
        press("u")
        screen(1, "Prompt two?")
        assert browser.find_element(By.ID, "msg").text == "undone"
        press("t")
        screen(2, "Prompt three?")
        browser.find_element(By.ID, "key-s").click()  # the buttons work too
        screen(3, None)
        # a request naming a non-loopback Host (DNS rebinding) is refused on a token-less labeler
        assert request(f"http://127.0.0.1:{lab.port}/", headers={"Host": "evil.example"})[0] == 403
    raw = PreferenceStore(path).records(raw=True)
    assert [(r["type"], r.get("prompt"), r.get("choice")) for r in raw] == [
        ("preference", "Prompt one?", 0), ("preference", "Prompt two?", 1), ("undo", None, None),
        ("preference", "Prompt two?", "tie"), ("skip", "Prompt three?", None)]
    assert raw[2]["undoes"] == raw[1]["id"]
    assert {r["annotator"] for r in raw} == {store.annotator_id("wendy")}
    assert [(r["prompt"], r["choice"]) for r in store.preferences()] == [("Prompt one?", 0), ("Prompt two?", "tie")]
    assert len(store.done_keys("wendy")) == 3


def test_non_loopback_host_requires_the_token(tmp_path):
    store = PreferenceStore(tmp_path / "rate.jsonl")
    printed = []
    lab = serve_web_labeler(store, [("How are you?", "Fine."), ("2+2?", "4")], host="0.0.0.0", mode="rate",
                            block=False, print_fn=printed.append)
    try:
        token, base = lab.token, f"http://127.0.0.1:{lab.port}"
        assert token and len(token) >= 16 and f"?token={token}" in printed[0]
        for path in ("/", "/api/next?annotator=al", f"/api/next?annotator=al&token={token[:-1]}x"):
            assert request(base + path)[0] == 403, path
        assert request(base + "/api/judge", {"annotator": "al", "key": "k", "rating": 3})[0] == 403
        assert request(base + "/api/undo", {"annotator": "al"})[0] == 403
        q = f"token={token}"
        status, html = request(f"{base}/?{q}")
        assert status == 200 and "fastrlhf labeler" in html and '"rate"' in html
        status, state = request(f"{base}/api/next?annotator=al&{q}")
        assert status == 200 and (state["done"], state["total"]) == (0, 2)
        first = state["item"]
        assert first["prompt"] == "How are you?" and first["completions"] == ["Fine."]
        judge = f"{base}/api/judge?{q}"
        status, state = request(judge, {"annotator": "al", "key": first["key"], "rating": 4})
        assert status == 200 and state["done"] == 1 and state["item"]["prompt"] == "2+2?"
        assert request(judge, {"annotator": "al", "key": first["key"], "rating": 4})[0] == 409
        assert request(judge, {"annotator": "al", "key": state["item"]["key"], "rating": 9})[0] == 400
        assert request(judge, {"annotator": "al", "key": "nope", "rating": 3})[0] == 404
        assert request(judge, {"annotator": "", "key": first["key"], "rating": 3})[0] == 400
        assert request(judge, {"annotator": "al", "rating": 3}, headers={"Content-Type": "text/plain"})[0] == 415
        # another annotator labels concurrently, from the start of the queue
        status, other = request(f"{base}/api/next?annotator=bo&{q}")
        assert other["done"] == 0 and other["item"]["key"] == first["key"]
        assert request(judge, {"annotator": "bo", "key": first["key"], "rating": 2})[0] == 200
        status, state = request(f"{base}/api/undo?{q}", {"annotator": "al"})
        assert status == 200 and state["undone"] == first["key"] and state["item"]["key"] == first["key"]
        assert request(f"{base}/api/undo?{q}", {"annotator": "al"})[1]["undone"] is None
    finally:
        lab.stop()
    assert [(r["annotator"], r["rating"]) for r in store.ratings()] == [(store.annotator_id("bo"), 2)]


def test_bad_arguments_are_named(tmp_path):
    store = PreferenceStore(tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match="port must be"):
        WebLabeler(store, ITEMS, port=70000)
    with pytest.raises(ValueError, match="token must be"):
        WebLabeler(store, ITEMS, token="short")
    with pytest.raises(TypeError, match="store must be a PreferenceStore"):
        WebLabeler(str(tmp_path), ITEMS)
    assert WebLabeler(store, ITEMS, host="localhost").token is None
    assert WebLabeler(store, ITEMS, host="192.168.0.7").token is not None
