"""The concept explorer (serve/static/) in a real Chromium against the served world (conftest's
`served_world`: the world CLIP with the demo's block SAE, its catalog from a real label job).

One browser for the module, a fresh context (so a fresh sessionStorage) per test. The tests write
the screenshots the README shows to docs/explorer/.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from vlsae_ray.interpret.ground_truth import WORLD_NAMES, held_names
from vlsae_ray.world import generate_items

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
expect = sync_api.expect
expect.set_options(timeout=30_000)  # a steer runs the model twice on 2 shared cores
CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)"
    ),
]
SHOTS = Path(__file__).parents[2] / "docs" / "explorer"
LAPTOP, PHONE = {"width": 1280, "height": 800}, {"width": 390, "height": 844}
CONCEPT = WORLD_NAMES[("colour", "red")]  # "red objects"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser, served_world):
    """open_page(route, key=the server's key) -> a page at `route` with the key in sessionStorage."""
    contexts, errors = [], []

    def open_page(route: str, key: str | None = served_world.key):
        context = browser.new_context(viewport=LAPTOP)
        contexts.append(context)
        if key is not None:
            script = f"sessionStorage.setItem('vlsae-api-key', {key!r})"
            context.add_init_script(f"if (location.origin == {served_world.url!r}) {script}")
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.on("pageerror", lambda error: errors.append(error))
        page.goto(f"{served_world.url}/{route}")
        return page

    yield open_page
    for context in contexts:
        context.close()
    assert not errors, errors


def world_png(tmp_path: Path, **labels: str) -> tuple[Path, dict]:
    """A world test image holding `labels` (e.g. colour="blue"), saved as PNG."""
    item = next(i for i in generate_items(200, seed=11, split="test") if labels.items() <= i.labels.items())
    path = tmp_path / f"{item.id}.png"
    item.image.save(path)
    return path, item.labels


def test_search_finds_a_latent_whose_top_images_share_the_concept(open_page):
    page = open_page("#/search")
    page.get_by_label("Concept name").fill(CONCEPT)
    page.get_by_label("Concept name").press("Enter")
    found = page.locator("#found")  # each render says what it shows: wait for it before the next step
    expect(found).to_have_text(re.compile(f"match “{CONCEPT}”; the first .* by MS"))
    page.get_by_role("button", name="Confidence").click()
    expect(found).to_have_text(re.compile(f"match “{CONCEPT}”; the first .* by Confidence"))
    first = page.locator("table.results tbody tr").first
    assert CONCEPT in first.locator("td").nth(1).inner_text()
    page.screenshot(path=SHOTS / "search.png")

    first.locator("a").click()
    page.wait_for_url("**/#/saes/block/latents/*")
    images = page.locator(".gallery img")
    page.wait_for_function(
        "() => { const all = [...document.querySelectorAll('.gallery img')];"
        " return all.length > 0 && all.every(i => i.complete && i.naturalWidth > 0); }"
    )
    ids = page.locator(".gallery .id").all_inner_texts()
    assert images.count() == len(ids) >= 5
    assert CONCEPT in held_names(ids), (ids, held_names(ids))
    assert page.locator(".histogram rect").count() > 0
    assert CONCEPT in page.locator("h1").inner_text()
    page.screenshot(path=SHOTS / "latent.png", full_page=True)
    # readable on a phone: nothing wider than the screen but the results table's own scroller
    page.set_viewport_size(PHONE)
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]


def test_uploading_a_world_image_lists_its_concepts_and_overlays_a_latent_map(open_page, tmp_path):
    image, labels = world_png(tmp_path, colour="blue", count="three")
    page = open_page("#/upload")
    page.get_by_label("Image").set_input_files(image)
    page.locator(".concepts button[aria-pressed=true]").wait_for()
    names = page.locator(".concepts .name").all_inner_texts()
    blue = WORLD_NAMES[("colour", "blue")]
    assert len(names) == 10 and blue in names, names
    # the first concept's map is drawn at once; choosing another (from the keyboard) redraws it
    last_blue = len(names) - 1 - names[::-1].index(blue)
    assert last_blue > 0
    latent = page.locator(".concepts li a").nth(last_blue).inner_text().lstrip("#")
    page.locator(".concepts button").nth(last_blue).focus()
    page.keyboard.press("Enter")
    expect(page.locator(".concepts button").nth(last_blue)).to_have_attribute("aria-pressed", "true")
    expect(page.locator(".hint")).to_contain_text(f"where latent {latent} fires")
    painted = page.evaluate(
        "() => { const c = document.querySelector('canvas.overlay');"
        " const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " return !c.hidden && data.some((value, i) => i % 4 == 3 && value > 0); }"
    )
    assert painted
    page.screenshot(path=SHOTS / "upload.png", full_page=True)


def test_moving_the_steering_slider_changes_the_answer(open_page, served_world, tmp_path):
    """A blue image, steered with the most confident "red objects" latent: at the slider's start (its
    largest activation) CLIP still says blue; at its end (30 times that) it says red."""
    found = served_world.call("GET", "/v1/saes/block/latents", params={"q": CONCEPT, "sort": "confidence"})
    latent = found.json()["latents"][0]["latent"]
    image, _ = world_png(tmp_path, colour="blue")
    page = open_page(f"#/steer?sae=block&latent={latent}")
    page.get_by_label("Image").set_input_files(image)
    default, steered = page.locator(".output .answer").nth(0), page.locator(".output .answer").nth(1)
    expect(steered).to_have_text("blue")
    page.get_by_label("Strength").focus()
    page.keyboard.press("End")
    expect(steered).to_have_text("red")
    expect(default).to_have_text("blue")
    page.screenshot(path=SHOTS / "steer.png", full_page=True)


def test_a_wrong_key_and_a_refused_request_show_their_error(open_page, served_world):
    page = open_page("#/search", key="not-the-key")
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("The server refused the API key (401")
    assert page.evaluate("document.activeElement.id") == "key"  # the key field, ready to type in
    page.keyboard.press("Control+A")
    page.keyboard.type(served_world.key)
    page.keyboard.press("Enter")
    page.locator("table.results tbody tr").first.wait_for()
    expect(alert).to_be_hidden()
    # a latent the SAE does not have: the server's 404 and its reason, in words
    n_latents = served_world.call("GET", "/v1/saes").json()["saes"][0]["n_latents"]
    page.goto(f"{served_world.url}/#/saes/block/latents/{n_latents}")
    expect(alert).to_contain_text("The server refused the request (404)")
    expect(alert).to_contain_text(f"no latent {n_latents}")
