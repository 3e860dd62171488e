"""The web page of `jointface serve`, end to end in headless Chromium (Debian's, driven by Playwright).

The server runs for real (uvicorn on 127.0.0.1, a free port). Screenshots are
written to ``test-artifacts/serve/`` in the repository (or
``$JOINTFACE_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from index import Gallery
from jointface.server import keys as api_keys
from jointface.server.app import ServeConfig, create_app

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("JOINTFACE_CHROMIUM", "/usr/bin/chromium")


def artefacts() -> Path:
    folder = Path(os.environ.get("JOINTFACE_TEST_ARTIFACTS", REPO / "test-artifacts")) / "serve"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def live_server(tmp_path, dlib_engine):
    home = tmp_path / "home"
    app = create_app(ServeConfig(home=home, keep_thumbnails=True, detect_timeout_s=600), dlib_engine)
    with Gallery.open(home) as gallery:
        secret = api_keys.create_key(gallery.store, "page", "admin")[1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(600):  # at most 60 s
        if server.started:
            break
        time.sleep(0.1)
    assert server.started, "the server did not start"
    yield f"http://127.0.0.1:{port}", secret, home
    server.should_exit = True
    thread.join(30)


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (README ci:setup)", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=["--no-sandbox", "--disable-gpu"])
        yield chromium
        chromium.close()


def test_page_enrol_search_rename_remove(live_server, browser, knn_dir):
    from playwright.sync_api import expect

    url, secret, home = live_server
    out = artefacts()
    page = browser.new_page(viewport={"width": 1100, "height": 1400})
    page.set_default_timeout(120_000)  # dlib on a busy 2-core machine
    expect.set_options(timeout=120_000)
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url + "/")

    # the key is asked for once; a wrong one is refused with a message
    page.fill("#key-input", "jf_wrong")
    page.click("#key-form button")
    expect(page.locator("#key-error")).to_contain_text("refused")
    page.fill("#key-input", secret)
    page.click("#key-form button")
    expect(page.locator("#status")).to_contain_text("0 people")

    # enrol knn_examples/train, one person at a time, through the form
    for person_dir in sorted((knn_dir / "train").iterdir()):
        page.fill("#enrol-name", person_dir.name)
        page.set_input_files("#enrol-files", [str(p) for p in sorted(person_dir.iterdir())])
        page.click("#enrol-form button[type=submit]")
        expect(page.locator("#enrol-message")).to_contain_text(f"{person_dir.name}: ")
        assert "not enrolled" not in page.inner_text("#enrol-message")
    expect(page.locator("#people li")).to_have_count(5)
    expect(page.locator("#people img")).to_have_count(9)  # one thumbnail per enrolled photo (at most 3 each)
    page.wait_for_function("[...document.querySelectorAll('#people img')].every(i => i.complete && i.naturalWidth > 0)")

    # pick a photo: boxes and names on it
    page.set_input_files("#search-file", str(knn_dir / "test" / "obama_and_biden.jpg"))
    labels = page.locator("#picture .face-label")
    named = {name: labels.filter(has_text=re.compile(rf"^{name} \d")) for name in ("obama", "biden")}
    expect(named["obama"]).to_have_count(1)
    expect(named["biden"]).to_have_count(1)
    for name in ("obama", "biden"):  # each label sits on the picture
        box = named[name].bounding_box()
        picture = page.locator("#picture-img").bounding_box()
        assert picture["x"] <= box["x"] <= picture["x"] + picture["width"]
        assert picture["y"] - box["height"] <= box["y"] <= picture["y"] + picture["height"]
    page.locator("#result").screenshot(path=str(out / "search_obama_and_biden.png"))
    page.screenshot(path=str(out / "page.png"), full_page=True)

    # drop a photo on the drop zone
    photo = (knn_dir / "test" / "obama1.jpg").read_bytes()
    page.evaluate("""async (bytes) => {
        const transfer = new DataTransfer();
        transfer.items.add(new File([new Uint8Array(bytes)], "obama1.jpg", {type: "image/jpeg"}));
        document.getElementById("drop-zone").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer,
                                                                                   bubbles: true}));
    }""", list(photo))
    expect(labels).to_have_count(1)
    expect(labels.first).to_contain_text("obama")

    # rename
    page.locator("#people li[data-name='alex_lacamoire'] button.rename").click()
    page.fill("#people li[data-name='alex_lacamoire'] .rename-form input", "Alex Lacamoire")
    page.click("#people li[data-name='alex_lacamoire'] .rename-form button")
    expect(page.locator("#people li[data-name='Alex Lacamoire']")).to_have_count(1)

    # remove, with a confirmation: cancel keeps the person, confirm removes them
    page.locator("#people li[data-name='rose_leslie'] button.remove").click()
    expect(page.locator("#confirm-dialog")).to_be_visible()
    page.screenshot(path=str(out / "confirm_remove.png"))
    page.click("#confirm-cancel")
    expect(page.locator("#people li[data-name='rose_leslie']")).to_have_count(1)
    page.locator("#people li[data-name='rose_leslie'] button.remove").click()
    page.click("#confirm-ok")
    expect(page.locator("#people li[data-name='rose_leslie']")).to_have_count(0)
    expect(page.locator("#people li")).to_have_count(4)
    page.screenshot(path=str(out / "after_remove.png"), full_page=True)

    # a face of someone no longer enrolled: unknown, with the nearest person named
    page.set_input_files("#search-file", str(knn_dir / "test" / "kit_with_rose.jpg"))
    expect(labels).to_have_count(2)
    expect(labels.filter(has_text="unknown (nearest: ")).to_have_count(1)
    expect(labels.filter(has_text=re.compile(r"^kit_harington \d"))).to_have_count(1)

    with Gallery.open(home) as gallery:
        names = {person.name for person in gallery.people()}
    assert names == {"Alex Lacamoire", "biden", "kit_harington", "obama"}
    assert len(list((home / "thumbnails").glob("*.jpg"))) == 7  # rose_leslie's two went with her
    assert errors == []
    assert (out / "search_obama_and_biden.png").stat().st_size > 10_000
