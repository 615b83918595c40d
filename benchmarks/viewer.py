"""The viewer's size, first paint and frame rate, in headless Chromium, on a built run.

    .venv/bin/python benchmarks/viewer.py [RUN] [--map blocks.10] [--size 20] [--frames 120] [--screenshots DIR]

RUN defaults to data/runs/demo (build it with `atlas run configs/demo.toml`). Reports:
- the size of RUN/viewer/ (MiB);
- first paint: from navigation start to the first frame drawn with tiles, opened from file://
  (the median of --loads fresh page loads);
- frames per second while panning and while zooming the map of --map with the whole N x N grid
  (--size) on screen: a wheel or drag step is dispatched at every animation frame for --frames
  frames, and the frames the viewer drew are counted against the time taken.
With --screenshots, the states are saved there (initial, zoomed, hover, panel, class filter,
side by side) for the README and for a person to look at.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default=str(ROOT / "data" / "runs" / "demo"))
    parser.add_argument("--map", default="blocks.10")
    parser.add_argument("--size", type=int, default=20, help="grid size whose every icon is on screen while measuring")
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--screenshots", default=None)
    args = parser.parse_args()
    folder = Path(args.run) / "viewer"
    index = folder / "index.html"
    if not index.is_file():
        print(f"{index} not found; run `atlas run configs/demo.toml` (or `atlas view RUN`) first", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})  # a 20x20 grid whole on screen
        paints = []
        for _ in range(args.loads):
            page.goto("about:blank")  # else a second goto to the same URL is a same-page hash change
            page.goto(index.as_uri() + f"#map={args.map}")
            page.wait_for_function("window.ATLAS_VIEW && ATLAS_VIEW.ready() && ATLAS_VIEW.firstPaint() > 0")
            paints.append(page.evaluate("ATLAS_VIEW.firstPaint()"))
        page.goto("about:blank")
        page.goto(index.as_uri() + f"#map={args.map}")
        page.wait_for_function("window.ATLAS_VIEW && ATLAS_VIEW.ready()")
        zoom = fit_zoom(page, args.size)
        shown = page.evaluate("ATLAS_VIEW.state()")
        pan = measure(page, args.frames, "pan", zoom)
        fit_zoom(page, args.size)
        zoom_fps = measure(page, args.frames, "zoom", zoom)
        assert page.evaluate("ATLAS_VIEW.state().size") == args.size, "the zoom left the grid size"
        if args.screenshots:
            screenshots(page, Path(args.screenshots), args.map)
        browser.close()
    print(f"viewer: {folder} {size / 2**20:.1f} MiB")
    print(f"first paint from file://: median {statistics.median(paints):.0f} ms of {len(paints)} loads "
          f"({', '.join(f'{v:.0f}' for v in paints)})")
    print(f"{args.map} at {shown['size']}x{shown['size']} (zoom {zoom:.2f}, every cell on screen): "
          f"pan {pan:.0f} frames/s, zoom {zoom_fps:.0f} frames/s over {args.frames} steps")
    return 0


def fit_zoom(page, size: int) -> float:
    """The smallest zoom at which the map shows its size x size grid (whole map still on screen)."""
    zoom = 1.01
    while zoom < 4:
        page.evaluate(f"location.hash = location.hash.replace(/&?z=[^&]*/, '') + '&z={zoom}'")
        page.wait_for_function("ATLAS_VIEW.ready()")
        if page.evaluate("ATLAS_VIEW.state().size") == size:
            return zoom
        zoom *= 1.02
    raise SystemExit(f"the map never shows a {size}x{size} grid; pick --size from its grid sizes")


def measure(page, frames: int, kind: str, zoom: float) -> float:
    """Frames drawn per second while a pan (drag) or zoom (wheel) step is dispatched every frame."""
    box = page.locator("#pane0").bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    return page.evaluate("""([kind, frames, cx, cy]) => new Promise((done) => {
        const canvas = document.querySelector('#pane0 canvas');
        const start = ATLAS_VIEW.frames(), t0 = performance.now();
        let k = 0;
        if (kind === 'pan') canvas.dispatchEvent(new PointerEvent('pointerdown', {pointerId: 7, clientX: cx, clientY: cy, bubbles: true}));
        function step() {
          if (k++ >= frames) {
            if (kind === 'pan') canvas.dispatchEvent(new PointerEvent('pointerup', {pointerId: 7, clientX: cx, clientY: cy, bubbles: true}));
            done((ATLAS_VIEW.frames() - start) / ((performance.now() - t0) / 1000));
            return;
          }
          const wobble = Math.sin(k / 8);
          if (kind === 'pan') {
            canvas.dispatchEvent(new PointerEvent('pointermove', {pointerId: 7, clientX: cx + 3 * wobble, clientY: cy + 2 * wobble, bubbles: true}));
          } else {
            canvas.dispatchEvent(new WheelEvent('wheel', {deltaY: 1.5 * wobble, clientX: cx, clientY: cy, bubbles: true, cancelable: true}));
          }
          requestAnimationFrame(step);
        }
        requestAnimationFrame(step);
    })""", [kind, frames, cx, cy])


def screenshots(page, out: Path, map_name: str) -> None:
    """The states a reader of README looks at."""
    out.mkdir(parents=True, exist_ok=True)
    page.goto(page.url.split("#")[0] + f"#map={map_name}&z=1.3")
    page.wait_for_function("ATLAS_VIEW.ready()")
    page.wait_for_timeout(500)
    page.screenshot(path=str(out / "viewer-initial.png"))
    state = page.evaluate("ATLAS_VIEW.state()")
    cx, cy = page.evaluate(f"ATLAS_VIEW.cellCentre(0, {state['size'] // 2}, {state['size'] // 2})")
    page.mouse.move(cx, cy)
    page.wait_for_timeout(300)
    page.screenshot(path=str(out / "viewer-hover.png"))
    page.mouse.click(cx, cy)
    page.wait_for_timeout(800)
    page.screenshot(path=str(out / "viewer-panel.png"))
    page.goto(page.url.split("#")[0] + f"#map={map_name}&z=1.3&class=beagle&labels=1")
    page.wait_for_function("ATLAS_VIEW.ready()")
    page.wait_for_timeout(500)
    page.screenshot(path=str(out / "viewer-class.png"))
    page.goto(page.url.split("#")[0] + "#map=blocks.10&with=blocks.15&z=1")
    page.wait_for_function("ATLAS_VIEW.ready()")
    cx, cy = page.evaluate("ATLAS_VIEW.cellCentre(0, 2, 7)")
    page.mouse.move(cx, cy)
    page.wait_for_timeout(500)
    page.screenshot(path=str(out / "viewer-side-by-side.png"))


if __name__ == "__main__":
    sys.exit(main())
