"""The viewer in a real Chromium (Playwright), opened from file:// on a tiny real run.

Each state it reaches is saved as a screenshot in data/test-screenshots/viewer/ for a person to
look at. Without Chromium these tests skip with a reason that says how to install it; CI sets
ATLAS_REQUIRE_BROWSER=1, which turns that skip into a failure.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from atlas.store import Run
from browser import SCREENSHOTS, require_browser
from test_view import build_run

pytestmark = pytest.mark.browser
SHOTS = SCREENSHOTS / "viewer"
GOLDFISH = 1  # ImageNet class index


@pytest.fixture(scope="module")
def chromium():
    path = require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def viewer_run(tmp_path_factory):
    """The tiny run of test_view with grids of 1 (a map of one cell), 2 and 4 cells a side, icons at
    1 only (2 and 4 show preview tiles: the tiny model's icons are all much the same grey, the
    generated images' patches are not). On this tiny map every size but the coarsest has cells
    bigger than the viewer's 40 px threshold at any zoom above 1, so the viewer shows 1 at zoom 1
    and 4 once zoomed in."""
    return build_run(tmp_path_factory.mktemp("viewer-browser"), "--set", "grid.sizes=[1, 2, 4]",
                     render_sizes="[1]")


@pytest.fixture
def page(chromium, viewer_run):
    """A fresh page on the viewer, with every console error and page error collected."""
    context = chromium.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.errors = []
    page.on("console", lambda msg: page.errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.goto((viewer_run / "viewer" / "index.html").as_uri())
    wait_ready(page)
    yield page
    assert page.errors == [], page.errors
    context.close()


def wait_ready(page) -> None:
    page.wait_for_function("window.ATLAS_VIEW && ATLAS_VIEW.ready()", timeout=15_000)


def state(page) -> dict:
    return page.evaluate("ATLAS_VIEW.state()")


def shoot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"))


def zoom_to(page, size: int) -> None:
    """Wheel-zooms in over the pane's centre until the grid of `size` is shown."""
    box = page.locator("#pane0").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    for _ in range(40):
        if state(page)["size"] == size:
            break
        page.mouse.wheel(0, -240)
        page.wait_for_timeout(30)
    assert state(page)["size"] == size
    wait_ready(page)


def densest_cell(grid) -> tuple[int, int, int]:
    """(row, x, y) of the grid's cell with the most samples."""
    i = int(np.argmax(grid.count))
    x, y = (int(v) for v in grid.cell[i])
    return i, x, y


def centre(page, pane: int, x: int, y: int) -> tuple[float, float]:
    """The page coordinates of cell (x, y)'s centre, after bringing it to the middle of the view
    (the zoom is kept, so the grid shown stays the same)."""
    info = state(page)
    size = info["size"]
    page.evaluate("([x, y]) => { const h = new URLSearchParams(location.hash.slice(1)); h.set('x', x); "
                  "h.set('y', y); location.hash = h.toString(); }", [(x + 0.5) / size, (y + 0.5) / size])
    page.wait_for_function(f"Math.abs(ATLAS_VIEW.state().x - {(x + 0.5) / size}) < 1e-6")
    wait_ready(page)
    cx, cy = page.evaluate(f"ATLAS_VIEW.cellCentre({pane}, {x}, {y})")
    return cx, cy


def test_loads_from_file_with_no_errors_and_paints(page):
    assert page.url.startswith("file://")
    info = state(page)
    assert info["map"] == "features" and info["size"] == 1 and info["zoom"] == 1  # the coarsest grid first
    assert page.evaluate("ATLAS_VIEW.firstPaint()") > 0 and page.evaluate("ATLAS_VIEW.frames()") > 0
    assert page.locator("#map option").count() == 3
    shoot(page, "1-loaded")


def test_wheel_zoom_changes_the_grid_size_shown(page):
    sizes = [state(page)["size"]]
    box = page.locator("#pane0").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    for delta in [-240] * 6 + [240] * 12:  # in, then all the way out
        page.mouse.wheel(0, delta)
        page.wait_for_timeout(30)
        if state(page)["size"] != sizes[-1]:
            sizes.append(state(page)["size"])
        if sizes[-1] == 4 and delta < 0:
            wait_ready(page)
            shoot(page, "2-zoomed-4x4")
    # the coarsest grid at zoom 1, the finer ones as cells grow on screen (on this tiny run the
    # finest is already big enough at the first step in), and back to the coarsest
    assert sizes[0] == 1 and 4 in sizes and sizes[-1] == 1, sizes
    assert state(page)["zoom"] == 1


def test_hover_shows_the_top_classes_the_grid_holds(page, viewer_run):
    zoom_to(page, 4)
    grid = Run.open(viewer_run).grid_file()
    g = grid.grid("features", 4)
    i, x, y = densest_cell(g)
    page.mouse.move(*centre(page, 0, x, y))
    tooltip = page.locator("#tooltip")
    tooltip.wait_for(state="visible")
    text = tooltip.inner_text()
    assert f"{int(g.count[i])} samples" in text.replace(",", "")
    for c in g.top_class[i, :5]:
        assert grid.class_names[int(c)] in text, (grid.class_names[int(c)], text)
    shoot(page, "3-hover")


def test_click_opens_the_panel_with_nine_patches_and_the_inspect_command(page, viewer_run):
    zoom_to(page, 4)
    store = Run.open(viewer_run)
    g = store.grid("features", 4)
    i, x, y = densest_cell(g)
    page.mouse.click(*centre(page, 0, x, y))
    panel = page.locator("#panel")
    panel.wait_for(state="visible")
    assert page.locator("#panel-members .member").count() == min(9, int(g.count[i]))
    with store.activations() as acts:  # every member is named by its image file
        files = {Path(p).name for p in acts.images.path[acts.layer("features").image[g.members(i)]]}
    names = page.locator("#panel-members .member-name").all_inner_texts()
    assert len(names) == min(9, int(g.count[i])) and set(names) <= files
    command = page.locator("#panel-command").inner_text()
    assert command == f"atlas inspect {store.root} --layer features --grid 4 --cell {x} {y}"
    assert state(page)["cell"] == [x, y]
    page.wait_for_timeout(300)  # the patch sheets load
    shoot(page, "4-panel")


def test_a_class_filter_tints_most_the_cells_most_attributed_to_it(page, viewer_run):
    page.select_option("#map", "deep")
    wait_ready(page)
    zoom_to(page, 4)
    page.fill("#class", "goldfish")
    page.keyboard.press("Enter")
    assert state(page)["cls"] == "goldfish"
    g = Run.open(viewer_run).grid("deep", 4)
    tints = [page.evaluate(f"ATLAS_VIEW.tint({x}, {y})") for x, y in g.cell.tolist()]
    attr = g.attr[:, GOLDFISH]
    assert int(np.argmax(np.abs(tints))) == int(np.argmax(np.abs(attr)))  # the strongest first
    assert abs(max(tints, key=abs)) == pytest.approx(1.0, abs=0.02)
    order = np.argsort(-attr)
    assert np.all(np.diff(np.asarray(tints)[order]) <= 0.02)  # tint follows attribution
    assert np.sign(tints).tolist() == np.sign(np.round(attr / np.abs(attr).max(), 2)).tolist()
    shoot(page, "5-class-goldfish")


def test_the_url_hash_round_trips(chromium, page, viewer_run):
    page.select_option("#map", "deep/class-goldfish")
    wait_ready(page)
    zoom_to(page, 4)
    page.fill("#class", "jack-o'-lantern")  # a class name with a quote
    page.keyboard.press("Enter")
    page.check("#labels")
    g = Run.open(viewer_run).grid("deep/class-goldfish", 4)
    x, y = (int(v) for v in g.cell[0])
    page.mouse.click(*centre(page, 0, x, y))
    page.wait_for_timeout(300)  # the hash is written at most every 120 ms
    before, url = state(page), page.url
    assert "class=jack-o'-lantern" in url or "class=jack-o%27-lantern" in url
    other = chromium.new_page()
    errors = []
    other.on("pageerror", lambda exc: errors.append(str(exc)))
    other.goto(url)
    wait_ready(other)
    after = state(other)
    assert errors == []
    for key in ("map", "size", "cell", "cls", "labels", "with"):
        assert after[key] == before[key], key
    assert after["zoom"] == pytest.approx(before["zoom"], rel=1e-3)
    assert after["x"] == pytest.approx(before["x"], abs=1e-4) and after["y"] == pytest.approx(before["y"], abs=1e-4)
    shoot(other, "6-from-the-link")
    other.close()


def test_odd_class_names_and_hashes_do_not_break_the_page(chromium, viewer_run):
    page = chromium.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    index = (viewer_run / "viewer" / "index.html").as_uri()
    page.goto(index + "#map=nowhere&class=Gr%C3%BC%C3%9Fe%20%22quoted%22&cell=zz&z=abc&with=%3Cscript%3E")
    wait_ready(page)
    assert state(page)["map"] == "features" and state(page)["cls"] is None and errors == []
    page.fill("#class", '"quoted" <b>Grüße</b>')
    page.keyboard.press("Enter")
    assert errors == [] and state(page)["cls"] is None
    page.close()


def test_the_map_chooser_switches_maps(page):
    page.select_option("#map", "deep/class-goldfish")
    wait_ready(page)
    assert state(page)["map"] == "deep/class-goldfish"
    assert page.locator("#pane0").inner_text().startswith("deep, class atlas of goldfish")  # the pane title
    shoot(page, "7-class-atlas")


def test_side_by_side_highlights_the_cells_with_the_same_images(page, viewer_run):
    page.select_option("#map", "deep")
    page.select_option("#with", "features")
    wait_ready(page)
    zoom_to(page, 4)
    store = Run.open(viewer_run)
    deep, features = store.grid("deep", 4), store.grid("features", 4)
    with store.activations() as acts:
        image_deep, image_features = acts.layer("deep").image, acts.layer("features").image
    i = int(np.argmin(deep.count))  # a small cell: its images are in some, not all, of the other map's cells
    x, y = (int(v) for v in deep.cell[i])
    page.mouse.move(*centre(page, 0, x, y))
    page.wait_for_timeout(100)
    lit = page.evaluate("ATLAS_VIEW.highlighted()")
    images = set(image_deep[deep.members(i)].tolist())
    expected = {tuple(int(v) for v in features.cell[j]) for j in range(len(features))
                if images & set(image_features[features.members(j)].tolist())}
    assert {(cx, cy) for cx, cy, _ in lit} == expected and lit
    assert max(s for _, _, s in lit) == pytest.approx(1.0)
    shoot(page, "8-side-by-side")


def test_panning_draws_frames_and_the_minimap_recentres(page):
    zoom_to(page, 4)
    frames = page.evaluate("ATLAS_VIEW.frames()")
    box = page.locator("#pane0").bounding_box()
    page.mouse.move(box["x"] + 300, box["y"] + 300)
    page.mouse.down()
    page.mouse.move(box["x"] + 200, box["y"] + 250, steps=10)
    page.mouse.up()
    page.wait_for_timeout(50)
    assert page.evaluate("ATLAS_VIEW.frames()") > frames and state(page)["x"] != 0.5
    mini = page.locator("#minimap").bounding_box()
    page.mouse.click(mini["x"] + mini["width"] * 0.25, mini["y"] + mini["height"] * 0.25)
    page.wait_for_timeout(50)
    assert state(page)["x"] < 0.5 and state(page)["y"] > 0.5  # the upper left quarter of the map
    page.keyboard.press("0")
    assert state(page)["zoom"] == 1


def test_atlas_view_serve_serves_it_over_http(chromium, viewer_run):
    import threading

    from atlas import view

    said = []
    thread = threading.Thread(target=view.serve, args=(viewer_run, 0, said.append), daemon=True)
    thread.start()
    for _ in range(200):  # the server says where it listens once it does
        if said:
            break
        threading.Event().wait(0.05)
    url = said[0].split(" at ")[1].split(" ")[0]
    page = chromium.new_page()
    errors = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.goto(url)
    wait_ready(page)
    assert errors == [] and page.url.startswith("http://127.0.0.1:")
    page.close()


def test_tiles_are_drawn_at_their_cells_the_right_way_up(page, viewer_run):
    """Each cell on screen shows its own tile: the mean colour drawn at a cell follows the mean
    colour of that cell's tile in the sprite sheet (a flipped or shuffled drawing would not)."""
    from PIL import Image

    from test_view import read_script

    page.evaluate("location.hash = 'map=features&z=1.02'")  # just past zoom 1: the 4x4 grid, all on screen
    page.wait_for_function("ATLAS_VIEW.state().size === 4 && ATLAS_VIEW.ready()")
    page.mouse.move(1, 1)  # no hover outline
    data = read_script(viewer_run / "viewer" / "data" / "features-4.js", "ATLAS.grid")
    sheet = np.asarray(Image.open(viewer_run / "viewer" / data["sprite"]).convert("RGB"), np.float32)
    shoot(page, "10-orientation")
    screen = np.asarray(Image.open(SHOTS / "10-orientation.png").convert("RGB"), np.float32)
    px, cols, cells = data["tile"], data["cols"], np.reshape(data["cell"], (-1, 2))
    drawn, expected = [], []
    for i, (x, y) in enumerate(cells.tolist()):
        cx, cy = page.evaluate(f"ATLAS_VIEW.cellCentre(0, {x}, {y})")
        drawn.append(screen[int(cy) - 20:int(cy) + 20, int(cx) - 20:int(cx) + 20].mean(axis=(0, 1)))
        r, c = divmod(i, cols)
        tile = sheet[r * px:(r + 1) * px, c * px:(c + 1) * px]
        expected.append(tile[px // 4:3 * px // 4, px // 4:3 * px // 4].mean(axis=(0, 1)))
    drawn, expected = np.ravel(drawn), np.ravel(expected)
    assert np.ptp(expected) > 60  # the tiles differ enough for the check to mean something
    assert np.corrcoef(drawn, expected)[0, 1] > 0.9 and np.abs(drawn - expected).mean() < 15


def test_a_run_without_icons_still_shows_its_previews(chromium, tmp_path):
    from atlas.cli import main

    from test_view import read_script

    run = build_run(tmp_path, render_sizes="[2]")
    for layer in ("features", "deep", "deep/class-goldfish"):
        shutil.rmtree(run / layer / "icons-2")  # as if render had not run yet
    assert main(["view", str(run)]) == 0
    info = read_script(run / "viewer" / "data" / "run.js", "ATLAS.run")
    assert not any(g["icons"] for m in info["maps"] for g in m["grids"])
    page = chromium.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto((run / "viewer" / "index.html").as_uri())
    wait_ready(page)
    assert errors == [] and page.evaluate("ATLAS_VIEW.frames()") > 0
    shoot(page, "9-previews-only")
    page.close()
