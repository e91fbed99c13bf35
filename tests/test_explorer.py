"""The explorer page (`GET /`): served from the package with no external resources, and driven in a real browser
(Playwright for Python on the system's Chromium) against a live server with the embedded EfficientNet-Lite0."""

from __future__ import annotations

import os
import re
import shutil
import time
import tomllib
from fnmatch import fnmatch
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camserve.api.routers.explorer import static_files
from camserve.cam.methods import METHOD_NAMES
from camserve.cam.render import COLORMAPS
from tests.apphelpers import live_server, running_app

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "service" / "camserve"
STATIC = PACKAGE / "static" / "explorer"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


# ---------------------------------------------------------------- plain HTTP


@pytest.mark.anyio
async def test_root_serves_the_page_and_its_files_without_a_key_while_the_api_needs_one(registry):
    async with running_app(registry, api_key="s3cret") as (client, _):
        page = await client.get("/", headers={"accept": "text/html"})  # a browser; "/" may answer others in JSON
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
        assert '<script type="module" src="/explorer/app.js">' in page.text
        assets = re.findall(r'(?:src|href)="(/explorer/[^"]+)"', page.text)
        assert set(assets) == {"/explorer/app.js", "/explorer/style.css"}
        for path, media in [
            ("/explorer/app.js", "text/javascript"),
            ("/explorer/colormaps.js", "text/javascript"),
            ("/explorer/style.css", "text/css"),
        ]:
            response = await client.get(path)
            assert response.status_code == 200, path
            assert response.headers["content-type"].startswith(media)
            assert response.headers["x-content-type-options"] == "nosniff"
        assert (await client.get("/models")).status_code == 401  # the API keeps its key; the page asks for it
        missing = await client.get("/explorer/../settings.py")
        assert missing.status_code == 404
        assert (await client.get("/explorer/nothing.js")).json() == {"detail": "no explorer file 'nothing.js'"}
        assert (await client.get("/docs")).status_code == 200
        document = (await client.get("/openapi.json")).json()
        assert "/" not in document["paths"] and not any(p.startswith("/explorer") for p in document["paths"])


@pytest.mark.anyio
async def test_the_labels_route_lists_the_models_labels_and_names_an_unknown_model_in_its_404(registry):
    async with running_app(registry, api_key="s3cret") as (client, _):
        key = {"X-API-Key": "s3cret"}
        labels = await client.get("/models/efficientnet-lite0/labels", headers=key)
        unknown = await client.get("/models/nope/labels", headers=key)
        unknown_layers = await client.get("/models/nope/layers", headers=key)
        without_key = await client.get("/models/efficientnet-lite0/labels")
    served = registry.get("efficientnet-lite0")
    assert labels.status_code == 200
    assert labels.json() == {"model": "efficientnet-lite0", "labels": list(served.labels)}
    assert len(labels.json()["labels"]) == served.num_classes == 1000
    assert labels.json()["labels"][285] == "Egyptian cat" and served.class_index("Egyptian cat") == 285
    assert unknown.status_code == 404
    assert unknown.json() == {"detail": "unknown model 'nope'; served models: efficientnet-lite0"}
    assert unknown.json() == unknown_layers.json()  # the same error path as /models/{name}/layers
    assert without_key.status_code == 401 and "API key" in without_key.json()["detail"]


def test_the_page_loads_nothing_from_elsewhere():
    """No CDN, no external fonts, scripts or styles: every URL in the files is relative to this origin."""
    assert set(static_files()) == {"index.html", "app.js", "colormaps.js", "style.css"}
    for name, body in static_files().items():
        text = body.decode("utf-8")
        assert not re.search(r"https?://", text), name
        assert "@import" not in text and "url(" not in text.replace("URL(", ""), name
        assert not re.search(r"""(?:src|href)=["']//""", text), name


def test_package_data_ships_every_explorer_file():
    """The wheel and the container image carry the page: pyproject's package-data globs match every file."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["camserve"]
    files = sorted(p.relative_to(PACKAGE).as_posix() for p in STATIC.iterdir() if p.is_file())
    assert files and all(any(fnmatch(f, pattern) for pattern in patterns) for f in files), (files, patterns)


def test_the_colormap_tables_are_the_servers():
    """The page colorizes heatmaps itself with the server's tables (matplotlib's), to within rounding."""
    import matplotlib

    text = (STATIC / "colormaps.js").read_text(encoding="utf-8")
    for name in COLORMAPS:
        found = re.search(rf"  {name}:\n((?:\s+\"[0-9a-f]+\"(?: \+|,)\n)+)", text)
        assert found, f"colormaps.js lacks {name}"
        table = np.frombuffer(bytes.fromhex("".join(re.findall(r'"([0-9a-f]+)"', found.group(1)))), np.uint8)
        expected = matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255
        assert np.abs(table.reshape(256, 3) - expected).max() <= 0.5


def test_the_openapi_document_lists_the_methods_and_colormaps_the_way_the_page_reads_them():
    """app.js reads `/explain`'s `method` and `colormap` parameters: 'text: a, b, c (remark)'."""
    from camserve.api import create_app
    from camserve.settings import Settings

    parameters = {p["name"]: p for p in create_app(Settings()).openapi()["paths"]["/explain"]["post"]["parameters"]}

    def listed(name: str) -> list[str]:
        return [s.strip() for s in re.search(r":\s*([^()]+)", parameters[name]["description"]).group(1).split(",")]

    assert listed("method") == list(METHOD_NAMES)
    assert listed("colormap") == list(COLORMAPS)
    assert parameters["method"]["schema"]["default"] in METHOD_NAMES


# ---------------------------------------------------------------- the browser


def chromium_path() -> str:
    """The system Chromium (Debian's `chromium`); skipped without one, except in CI where that is a failure."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    reason = "no chromium on PATH: apt-get install chromium (.ci/run installs it)"
    if IN_CI:
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if IN_CI:
            pytest.fail("CI=true and playwright is not installed: pip install -e '.[test]'")
        pytest.skip("playwright is not installed: pip install -e '.[test]'")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, headless=True, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


class Console:
    """Every console error and uncaught exception of a page; `expect` allows a known failed request's line."""

    def __init__(self, page) -> None:
        self.errors: list[str] = []
        self.allowed: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def unexpected(self) -> list[str]:
        left = list(self.errors)
        for allowed in self.allowed:
            match = next((e for e in left if allowed in e), None)
            if match is not None:
                left.remove(match)
        return left


def canvas_pixels(page, selector: str) -> list[int]:
    return page.eval_on_selector(
        selector, "c => Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)"
    )


def test_explorer_in_a_real_browser(browser, registry, chelsea, cat_jpeg, tmp_path):
    """Upload a real photo: "Egyptian cat" and its overlay at the photo's aspect ratio; the opacity slider changes
    the canvas with no request; compare methods shows one picture per method; a second class is explained beside
    the first; a text file gets the server's own 400 message; and the console stays free of errors."""
    photo = tmp_path / "chelsea.jpg"
    photo.write_bytes(cat_jpeg)
    height, width = chelsea.shape[:2]
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image at all\n")

    with live_server(registry, request_timeout_s=240) as url:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        console = Console(page)
        requests: list[str] = []
        page.on("request", lambda r: requests.append(f"{r.method} {r.url.removeprefix(url)}"))
        page.set_default_timeout(30_000)
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready=true]")
        assert page.locator("#model option").count() == 1
        methods = page.eval_on_selector_all("#method option", "options => options.map(o => o.value)")
        assert methods == list(METHOD_NAMES)
        assert page.eval_on_selector("#method", "s => s.value") == "gradcampp"
        layers = page.eval_on_selector_all("#layer option", "options => options.map(o => o.value)")
        assert len(layers) > 5 and page.eval_on_selector("#layer", "s => s.value") == "_swish"
        colormaps = page.eval_on_selector_all("#colormap option", "options => options.map(o => o.value)")
        assert colormaps == list(COLORMAPS)

        # upload: top-5 and the top-1 map with no further click, from one /explain call
        before = len(requests)
        page.set_input_files("#files", str(photo))
        card = page.locator(".card").first
        first = card.locator(".maps .map").first
        first.locator("canvas").wait_for()
        page.wait_for_function("() => !document.querySelector('.card[aria-busy]')")
        assert [r for r in requests[before:] if "/explain" in r or "/predict" in r] == [
            "POST /explain?model=efficientnet-lite0&method=gradcampp&top_k=5"
        ]
        predictions = card.locator(".prediction .label").all_inner_texts()
        assert len(predictions) == 5 and predictions[0] == "Egyptian cat"
        assert card.locator(".predictions").get_attribute("data-head") == "softmax"
        assert (
            card.locator(".predictions").evaluate("list => list.previousElementSibling.textContent").endswith("softmax")
        )
        assert first.locator(".title").inner_text() == "Egyptian cat"
        size = first.locator("canvas").evaluate("c => [c.width, c.height, c.clientWidth, c.clientHeight]")
        assert abs(size[0] / size[1] - width / height) < 0.01 and abs(size[2] / size[3] - width / height) < 0.02
        assert card.locator(".size").inner_text() == f"{width} × {height}"
        assert re.fullmatch(r"gradcampp: \d+ ms|gradcampp: \d+\.\d\d s", first.locator(".time").inner_text())

        # the map's value under the pointer
        first.locator("canvas").hover(position={"x": 10, "y": 10})
        assert re.fullmatch(r"value: [01]\.\d\d at \(\d+, \d+\)", first.locator(".value").inner_text())
        hovered = first.locator(".value").inner_text()
        first.locator("canvas").focus()  # and by keyboard: arrows move the probe
        first.locator("canvas").press("ArrowRight")
        moved = first.locator(".value").inner_text()
        assert re.fullmatch(r"value: [01]\.\d\d at \(\d+, \d+\)", moved) and moved != hovered

        # opacity and colormap: new pixels, no request
        before_pixels = canvas_pixels(page, ".card .maps .map canvas")
        before = len(requests)
        page.locator("#opacity").fill("0.9")
        after_pixels = canvas_pixels(page, ".card .maps .map canvas")
        assert page.locator("#opacity-value").inner_text() == "90%"
        changed = sum(a != b for a, b in zip(before_pixels, after_pixels, strict=True))
        assert changed > len(before_pixels) // 4, changed
        page.select_option("#colormap", "viridis")
        assert canvas_pixels(page, ".card .maps .map canvas") != after_pixels
        assert requests[before:] == []

        # copy as curl: the exact request, reproducible here
        page.context.grant_permissions(["clipboard-read", "clipboard-write"])
        first.locator(".copy-curl").click()
        curl = first.locator(".curl").inner_text()
        assert curl == (
            f"curl -sS -F 'image=@chelsea.jpg' '{url}/explain?model=efficientnet-lite0&method=gradcampp&top_k=5'"
        )
        assert page.evaluate("navigator.clipboard.readText()") == curl

        # downloads: the overlay at the photo's size, the server's grayscale heatmap
        with page.expect_download() as download:
            first.locator(".download-overlay").click()
        overlay = Image.open(download.value.path())
        assert overlay.size == (width, height) and overlay.mode in {"RGB", "RGBA"}
        with page.expect_download() as download:
            first.locator(".download-heatmap").click()
        heatmap = Image.open(download.value.path())
        assert heatmap.size == (width, height) and heatmap.mode == "L"
        assert download.value.suggested_filename == "chelsea-jpg-egyptian-cat-gradcampp-heatmap.png"

        # layer and counterfactual: the classes shown again, one request per change
        idle = "() => !document.body.hasAttribute('data-busy')"
        before = len(requests)
        page.select_option("#layer", "_blocks.10")
        page.wait_for_function(idle)
        page.check("#counterfactual")
        page.wait_for_function(idle)
        assert requests[before:] == [
            "POST /explain?model=efficientnet-lite0&method=gradcampp&top_k=5&layer=_blocks.10&target=285",
            "POST /explain?model=efficientnet-lite0&method=gradcampp&top_k=5&layer=_blocks.10&counterfactual=true"
            "&target=285",
        ]
        assert first.locator(".meta").inner_text().endswith("· _blocks.10 · counterfactual")
        page.select_option("#layer", "_swish")
        page.wait_for_function(idle)
        page.uncheck("#counterfactual")
        page.wait_for_function(idle)
        assert first.locator(".meta").inner_text().endswith("· gradcampp · _swish")

        # faithfulness: the server's scores under the map, in one more request; unchecked, they go again
        with page.expect_response(lambda r: "faithfulness=true" in r.url) as scored:
            page.check("#faithfulness")
        page.wait_for_function(idle)
        assert requests[-1] == (
            "POST /explain?model=efficientnet-lite0&method=gradcampp&top_k=5&faithfulness=true&target=285"
        )
        scores = scored.value.json()["results"][0]["explanations"][0]["faithfulness"]
        terms = first.locator(".faithfulness dt").all_inner_texts()
        assert terms == ["drop", "increase", "deletion AUC", "insertion AUC"]
        assert first.locator(".faithfulness dd").all_inner_texts() == [
            f"{scores['drop'] * 100:.1f}%",
            "yes" if scores["increase"] else "no",
            f"{scores['deletion_auc']:.3f}",
            f"{scores['insertion_auc']:.3f}",
        ]
        assert 0 <= scores["drop"] <= 1 and 0 < scores["insertion_auc"] <= 1
        page.uncheck("#faithfulness")
        page.wait_for_function(idle)
        assert first.locator(".faithfulness").is_hidden()

        # compare methods: one picture per method
        before = len(requests)
        card.locator("button.compare").click()
        grid = card.locator(".compare-grid")
        page.wait_for_function(  # Score-CAM at _swish: one forward per non-zero channel, seconds on 2 cores
            "n => document.querySelectorAll('.compare-grid .map canvas').length === n",
            arg=len(METHOD_NAMES),
            timeout=240_000,
        )
        assert grid.locator(".map").evaluate_all("nodes => nodes.map(n => n.dataset.method)") == list(METHOD_NAMES)
        assert len([r for r in requests[before:] if r.startswith("POST /explain")]) == len(METHOD_NAMES)

        # a second class, side by side with the first
        second_label = predictions[1]
        card.locator(".prediction").nth(1).click()
        page.wait_for_function("() => document.querySelectorAll('.card .maps .map').length === 2")
        assert card.locator(".maps .map .title").all_inner_texts() == ["Egyptian cat", second_label]

        screenshot = os.environ.get("CAMSERVE_SCREENSHOT")  # the README's picture: `make screenshot`
        if screenshot:
            before = len(requests)
            page.select_option("#colormap", "jet")
            page.locator("#opacity").fill("0.5")
            assert requests[before:] == []
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=screenshot, full_page=True)

        # a class typed by label, suggested from the model's labels
        field = card.locator("input[name=target]")
        before = len(requests)
        field.focus()
        page.wait_for_function("() => document.querySelectorAll('#labels option').length === 1000")
        assert requests[before:] == ["GET /models/efficientnet-lite0/labels"]  # no /predict of every class
        field.fill("golden retriever")
        field.press("Enter")
        page.wait_for_function("() => document.querySelectorAll('.card .maps .map').length === 3")
        assert card.locator(".maps .map .title").all_inner_texts()[2] == "golden retriever"

        # non-images, two at once: the server's own messages on their cards and in the alert. A text file is refused
        # by its media type (415); text under a .jpg name is refused when decoding fails (400)
        fake = tmp_path / "fake.jpg"
        fake.write_text("not a JPEG either\n")
        with (
            page.expect_response(lambda r: "/explain" in r.url and r.status == 415) as refused,
            page.expect_response(lambda r: "/explain" in r.url and r.status == 400) as undecodable,
        ):
            page.set_input_files("#files", [str(text_file), str(fake)])
        console.allowed += ["status of 415", "status of 400"]  # Chromium logs the failed requests themselves
        for name, response in [("notes.txt", refused.value), ("fake.jpg", undecodable.value)]:
            message = response.json()["detail"]
            error = page.locator(".card", has=page.locator("h2", has_text=name)).locator(".card-error")
            error.wait_for()
            assert error.inner_text() == f"{response.status}: {message}"
        assert "unsupported media type 'text/plain'" in refused.value.json()["detail"]
        assert re.fullmatch(r"(notes\.txt|fake\.jpg): (400|415): .+", page.locator("#error").inner_text())
        assert page.locator(".card").count() == 3

        # phone width: one column, nothing wider than the screen
        page.set_viewport_size({"width": 390, "height": 844})
        assert page.evaluate("document.documentElement.scrollWidth") <= 390

        assert console.unexpected() == [], console.errors
        page.close()


def test_explorer_asks_for_the_key_when_the_server_wants_one(browser, registry):
    with live_server(registry, api_key="s3cret") as url:
        page = browser.new_page()
        console = Console(page)
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready=true]")
        key = page.get_by_label("API key")
        assert key.is_visible() and page.locator("#model option").count() == 0
        console.allowed.append("status of 401")
        key.fill("wrong")
        key.press("Enter")
        page.wait_for_function("() => document.querySelector('#key-help').textContent.includes('refused')")
        console.allowed.append("status of 401")
        key.fill("s3cret")
        key.press("Enter")
        page.wait_for_selector("#key-form[hidden]", state="attached")
        assert page.locator("#model option").count() == 1
        assert console.unexpected() == [], console.errors
        page.close()


def test_a_dicom_file_is_explained_and_drawn_from_the_servers_windowed_picture(browser, registry, tmp_path):
    """Browsers cannot draw DICOM: the file is recognised by its bytes (no .dcm suffix needed), its first /explain also
    asks for an overlay of opacity 0, and the card's photo is that picture: at opacity 0 the canvas shows its gray."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom import examples

    scan = tmp_path / "scan"  # DICOM files often carry no suffix
    dataset = examples.ct
    dataset.WindowCenter, dataset.WindowWidth = 40, 400
    dataset.save_as(scan, enforce_file_format=True)
    assert pydicom.dcmread(scan).Rows == 128
    with live_server(registry, request_timeout_s=240) as url:
        page = browser.new_page()
        console = Console(page)
        page.set_default_timeout(60_000)
        requests: list[str] = []
        page.on("request", lambda r: requests.append(f"{r.method} {r.url.removeprefix(url)}"))
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready=true]")
        assert ".dcm" in page.get_attribute("#files", "accept")
        page.set_input_files("#files", str(scan))
        card = page.locator(".card").first
        card.locator(".maps .map canvas").wait_for()
        page.wait_for_function("() => !document.querySelector('.card[aria-busy]')")
        assert [r for r in requests if "/explain" in r] == [
            "POST /explain?model=efficientnet-lite0&method=gradcampp&top_k=5&overlay=true&alpha=0"
        ]
        assert card.locator(".size").inner_text() == "128 × 128" and card.locator(".card-error").is_hidden()
        page.locator("#opacity").fill("0")
        rgba = np.array(canvas_pixels(page, ".card .maps .map canvas")).reshape(-1, 4)
        assert (rgba[:, 0] == rgba[:, 1]).all() and (rgba[:, 1] == rgba[:, 2]).all() and rgba[:, 0].std() > 10
        assert console.unexpected() == [], console.errors
        page.close()


# ---------------------------------------------------------------- start-up: slow, failing, recovering


def hold_models(page) -> list:
    """Hold the page's `GET /models` (not /models/{name}/...) until the test continues it: a slow server, on cue."""
    held: list = []
    page.route(re.compile(r"/models(\?.*)?$"), lambda route: held.append(route))
    return held


def wait_for_held(page, held: list) -> None:
    for _ in range(200):
        if held:
            return
        page.wait_for_timeout(50)
    raise AssertionError("the page never asked for /models")


def test_a_photo_chosen_before_the_models_arrive_is_explained_once_they_do(browser, registry, cat_jpeg, tmp_path):
    """Chosen right after navigation, while /models is held: a card that says it waits, no request yet; once the
    models arrive it is explained with no second action, in exactly one /explain."""
    photo = tmp_path / "chelsea.jpg"
    photo.write_bytes(cat_jpeg)
    with live_server(registry, request_timeout_s=240) as url:
        page = browser.new_page()
        console = Console(page)
        page.set_default_timeout(60_000)
        requests: list[str] = []
        page.on("request", lambda r: requests.append(f"{r.method} {r.url.removeprefix(url)}"))
        held = hold_models(page)
        page.goto(url + "/")
        page.set_input_files("#files", str(photo))
        card = page.locator(".card").first
        card.wait_for()
        wait_for_held(page, held)
        assert card.locator("h2").inner_text() == "chelsea.jpg"
        assert card.locator(".waiting").is_visible()
        assert page.locator("#status").inner_text() == (
            "Loading the server's models… 1 image will be explained once they are loaded."
        )
        page.wait_for_timeout(500)  # and nothing is sent while the models are unknown
        assert [r for r in requests if "/explain" in r or "/predict" in r] == []
        assert page.get_attribute("body", "data-ready") is None

        held[0].continue_()
        card.locator(".maps .map canvas").wait_for()
        page.wait_for_function("() => !document.querySelector('.card[aria-busy]')")
        assert [r for r in requests if "/explain" in r or "/predict" in r] == [
            "POST /explain?model=efficientnet-lite0&method=gradcampp&top_k=5"
        ]
        assert card.locator(".maps .map .title").all_inner_texts() == ["Egyptian cat"]
        assert card.locator(".waiting").is_hidden() and page.locator(".card").count() == 1
        assert page.get_attribute("body", "data-ready") == "true"
        assert console.unexpected() == [], console.errors
        page.close()


def test_the_page_says_it_is_loading_while_the_models_list_is_pending(browser, registry):
    """Empty dropdowns are never the only sign: the status line says the models are loading (and, after 5 s,
    that the server has not answered yet), the selects say "loading…", and all of it goes when they arrive."""
    with live_server(registry) as url:
        page = browser.new_page()
        console = Console(page)
        held = hold_models(page)
        page.goto(url + "/")
        wait_for_held(page, held)
        assert page.locator("#status").inner_text() == "Loading the server's models…"
        assert page.get_attribute("body", "data-loading") == ""
        assert page.eval_on_selector("#model", "s => [s.disabled, ...[...s.options].map(o => o.text)]") == [
            True,
            "loading…",
        ]
        assert page.eval_on_selector("#layer", "s => [s.disabled, ...[...s.options].map(o => o.text)]") == [
            True,
            "loading…",
        ]
        page.wait_for_function(
            "() => document.querySelector('#status').textContent.startsWith('Still')", timeout=15_000
        )
        assert page.locator("#status").inner_text() == ("Still loading the server's models: no answer for 5.00 s…")

        held[0].continue_()
        page.wait_for_selector("body[data-ready=true]")
        assert page.locator("#status").inner_text() == "1 model served. Choose, drop or paste images."
        assert page.get_attribute("body", "data-loading") is None
        assert page.eval_on_selector("#model", "s => [s.disabled, ...[...s.options].map(o => o.value)]") == [
            False,
            "efficientnet-lite0",
        ]
        assert page.eval_on_selector("#layer", "s => [s.disabled, s.value]") == [False, "_swish"]
        assert page.locator("#startup").is_hidden()
        assert console.unexpected() == [], console.errors
        page.close()


def test_when_the_models_list_fails_the_page_says_why_and_tries_again(browser, registry, cat_jpeg, tmp_path):
    """/models answers 503 (models loading), then 500, then the connection is refused: each time the page says why
    in words and when it tries again (1 s, then 2 s); "Retry now" does not wait. A photo chosen meanwhile is
    explained once the models are finally listed."""
    photo = tmp_path / "chelsea.jpg"
    photo.write_bytes(cat_jpeg)
    failures = [
        lambda route: route.fulfill(status=503, json={"detail": "the service is starting: models are still loading"}),
        lambda route: route.fulfill(status=500, content_type="text/plain", body="Internal Server Error"),
        lambda route: route.abort("connectionrefused"),
    ]
    asked: list[float] = []

    def answer(route) -> None:
        asked.append(time.monotonic())
        if failures:
            failures.pop(0)(route)
        else:
            route.continue_()

    with live_server(registry, request_timeout_s=240) as url:
        page = browser.new_page()
        console = Console(page)
        console.allowed += ["status of 503", "status of 500", "ERR_CONNECTION_REFUSED"]
        page.set_default_timeout(60_000)
        page.route(re.compile(r"/models$"), answer)
        page.goto(url + "/")
        message = page.locator("#startup-message")

        def says(text: str) -> str:
            page.wait_for_function(
                "text => document.querySelector('#startup-message').textContent.includes(text)", arg=text
            )
            return message.inner_text()

        assert says("503") == (
            "The server is not ready yet (503: the service is starting: models are still loading). Trying again in 1 s."
        )
        assert page.locator("#status").inner_text() == "GET /models: 503."
        page.set_input_files("#files", str(photo))
        assert page.locator(".card .waiting").is_visible()
        assert says("500") == (
            "The server failed to list its models (500: Internal Server Error). Its log has the cause. "
            "Trying again in 2 s."
        )
        assert page.locator("#status").inner_text() == (
            "GET /models: 500. 1 image will be explained once they are loaded."
        )
        assert says("cannot be reached") == (
            f"The server cannot be reached (Failed to fetch). Is it running at {url}? Trying again in 3 s."
        )
        assert page.locator("#startup").is_visible() and page.eval_on_selector("#model", "s => s.disabled")
        page.get_by_role("button", name="Retry now").click()

        page.locator(".card .maps .map canvas").wait_for()
        assert page.locator("#startup").is_hidden()
        assert page.locator(".card .maps .map .title").all_inner_texts() == ["Egyptian cat"]
        assert page.eval_on_selector_all("#model option", "options => options.map(o => o.value)") == [
            "efficientnet-lite0"
        ]
        gaps = [later - earlier for earlier, later in pairwise(asked)]
        assert len(asked) == 4 and 0.9 < gaps[0] < gaps[1] and gaps[1] > 1.9 and gaps[2] < 2.9, gaps
        assert console.unexpected() == [], console.errors
        page.close()
