/* atlas viewer: a static, offline, zoomable activation atlas (the data are written by atlas/view.py).
 *
 * Data arrive as classic scripts, because Chromium lets a page opened from file:// load scripts and
 * images but not fetch files or load modules: data/run.js calls ATLAS.run(info), and each grid file
 * data/<key>.js, inserted on demand, calls ATLAS.grid(g). Each pane draws on one canvas from its
 * grid's sprite sheet, only the visible cells, and only when something changed (requestAnimationFrame
 * behind a needsDraw flag). The world is the layout's unit square, y upwards; the view is
 * (centre x, centre y, zoom), zoom 1 fitting the whole square in a pane.
 *
 * The two panes of "compare with" share ONE view (linked pan and zoom): the maps are different
 * layouts, but one window on both is the simplest way to compare regions and to follow the linked
 * hover (cells holding samples of the same images) from one map to the other.
 *
 * Test hooks: window.ATLAS_VIEW, at the end of this file.
 */
(function () {
  "use strict";

  // ---------------------------------------------------------------------------------------------
  // Settings

  const MIN_ZOOM = 1, MAX_ZOOM = 48;  // Distill's range
  const FIT_MARGIN_PX = 14;  // at zoom 1 the map leaves this much of the pane free, clear of the title
  const MIN_CELL_PX = 40;  // the finest grid whose cells are at least this big on screen is shown
  const LABEL_MIN_PX = 34;  // smaller cells get no label text: it would be unreadable
  const CLICK_SLOP_PX = 5;  // a press that moves less than this is a click, not a drag
  const HASH_WRITE_MS = 120;  // pan and zoom rewrite the URL at most this often (Chromium throttles history calls)
  const KEY_PAN = 0.12;  // arrow keys move the view by this fraction of the map at the current zoom
  const KEY_ZOOM = 1.25;
  const COLORS = {
    pane: "#eceae4", square: "#fbfbf9", missing: "#c9c9c9", hover: "#ffffff", select: "#ff9f1c",
    positive: "#d7301f", negative: "#2166ac", linked: "#ffe14d", shadow: "rgba(0,0,0,0.6)",
    labelBar: "rgba(0,0,0,0.6)", labelText: "#fff",
  };

  // ---------------------------------------------------------------------------------------------
  // State

  let run = null;  // ATLAS.run's info
  const view = {x: 0.5, y: 0.5, zoom: 1};  // shared by both panes
  // cell: the selected cell {pane, size, x, y}; clsIndex: the class filter's class, -1 for none
  const ui = {map: null, with: null, cell: null, cls: null, clsIndex: -1, density: false, labels: false};
  const grids = new Map();  // key -> decoded grid (decodeGrid)
  const failed = new Map();  // key -> the file that did not load
  const pending = new Map();  // key -> callbacks waiting for its script
  const pictures = new Map();  // url -> {img, state: "loading" | "ok" | "failed", waiters}
  const panes = [];
  let classLabels = null;  // run.classes as shown, duplicates told apart by index (className)
  let hover = null;  // {pane, grid, i}: the cell under the pointer
  let pointerAt = null;  // {pane, x, y}: where the pointer last hovered a pane, in client pixels
  let needsDraw = false, frames = 0, firstPaint = null;
  let imageMarks = null;  // Uint8Array over run.images, reused by every linked-hover computation

  // ---------------------------------------------------------------------------------------------
  // Small helpers

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text != null) node.textContent = String(text);  // never innerHTML: class names hold quotes and markup
    return node;
  }

  function byId(id) { return document.getElementById(id); }
  function clamp(v, lo, hi) { return v < lo ? lo : v > hi ? hi : v; }
  function num(v, digits) { return typeof v === "number" && isFinite(v) ? v.toFixed(digits) : "–"; }
  function setText(node, text) { if (node.textContent !== text) node.textContent = text; }  // no needless style work
  function setHidden(node, hidden) { if (node.hidden !== hidden) node.hidden = hidden; }

  function attrText(v) {
    if (typeof v !== "number" || !isFinite(v)) return "–";
    return Math.abs(v) >= 100 || v === 0 ? v.toFixed(0) : v.toPrecision(3);
  }

  // File names may hold spaces, quotes, '#', '%' or non-ASCII: encode each path segment.
  function encodePath(path) { return String(path).split("/").map(encodeURIComponent).join("/"); }

  function decodeBase64(text) {
    const bin = atob(text || "");
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return bytes;
  }

  // A class's name as shown and typed; a name two classes share (ImageNet's two "crane"s, two
  // "maillot"s) carries its index, "crane (#517)", so each can be told apart and chosen.
  function className(c) {
    if (c < 0) return "unlabelled";
    return classLabels && classLabels[c] != null ? classLabels[c] : "#" + c;
  }

  function labelClasses(names) {
    if (!Array.isArray(names)) return null;
    const seen = new Map();
    for (const n of names) seen.set(String(n), (seen.get(String(n)) || 0) + 1);
    return names.map((n, i) => seen.get(String(n)) > 1 ? String(n) + " (#" + i + ")" : String(n));
  }

  // An image's path: members' paths come with their grid (a run of a million images would not
  // fit them all in run.js); run.images is read where an older viewer folder has it.
  function imagePath(grid, i) {
    const paths = grid && grid.raw && grid.raw.paths;
    const path = paths && paths[i] != null ? paths[i] : run.images && run.images[i];
    return path == null ? null : String(path);
  }

  function imageName(grid, i) {
    const path = imagePath(grid, i);
    return path == null ? "image " + i : path.split(/[\\/]/).pop();
  }

  // Shell-quotes a word only when it needs it, so plain map names read as the contract shows them.
  function shellWord(word) {
    const s = String(word);
    return /^[A-Za-z0-9_.\/~:@%+=,-]+$/.test(s) ? s : "'" + s.replace(/'/g, "'\\''") + "'";
  }

  // ---------------------------------------------------------------------------------------------
  // Data arrival: ATLAS.run, ATLAS.grid, scripts and images loaded on demand

  function receiveRun(info) {
    run = info || {};
    classLabels = labelClasses(run.classes);
    if (!Array.isArray(run.maps)) run.maps = [];
    for (const map of run.maps) {
      map.grids = (Array.isArray(map.grids) ? map.grids : []).filter((g) => g && g.size >= 1);
      map.grids.sort((a, b) => a.size - b.size);
    }
    imageMarks = new Uint8Array(run.n_images || (Array.isArray(run.images) ? run.images.length : 0));
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
    else start();
  }

  function receiveGrid(raw) {
    if (!raw || raw.key == null) return;
    const grid = decodeGrid(raw);
    grids.set(grid.key, grid);
    requestDraw();
  }

  // A grid file's JSON -> typed arrays plus an (x, y) -> cell lookup for drawing and hit tests.
  function decodeGrid(g) {
    const size = Math.max(1, g.size | 0);
    const xy = Array.isArray(g.cell) ? g.cell : [];
    const m = xy.length >> 1;
    const index = new Int32Array(size * size).fill(-1);
    for (let i = 0; i < m; i++) {
      const x = xy[2 * i], y = xy[2 * i + 1];
      if (x >= 0 && x < size && y >= 0 && y < size) index[y * size + x] = i;
    }
    const bytes = decodeBase64(g.images);  // little-endian data, read on little-endian machines
    const ids = g.images_dtype === "uint32" ? new Uint32Array(bytes.buffer, 0, bytes.length >> 2)
      : new Uint16Array(bytes.buffer, 0, bytes.length >> 1);
    const count = Array.isArray(g.count) ? g.count : [];
    return {
      key: String(g.key), map: g.map, size, m, xy, index, raw: g, count,
      maxCount: g.max_count > 0 ? g.max_count : Math.max(1, ...count.slice(0, 1e5)),
      k: g.k > 0 && Array.isArray(g.top_class) ? g.k : 0,
      tile: g.tile > 0 ? g.tile : 64, cols: g.cols > 0 ? g.cols : 1, icons: !!g.icons,
      imageIds: ids, imagePtr: Array.isArray(g.images_indptr) ? g.images_indptr : [],
      sprite: loadImage(g.sprite ? encodePath(g.sprite) : spriteUrl(g.key)),
      attr: undefined, tint: null, tintIndex: -1,  // decoded and computed when the class filter asks
    };
  }

  function spriteUrl(key) { return "sprites/" + encodePath(key) + ".jpg"; }

  // Loads a grid's script once; `done` runs when it has arrived or failed.
  function loadGrid(key, done) {
    if (grids.has(key) || failed.has(key)) { if (done) done(); return; }
    if (pending.has(key)) { if (done) pending.get(key).push(done); return; }
    pending.set(key, done ? [done] : []);
    loadImage(spriteUrl(key));  // the sprite's usual name: fetched alongside the data, for a faster first paint
    const script = document.createElement("script");
    script.src = "data/" + encodePath(key) + ".js";
    script.onload = script.onerror = () => {
      if (!grids.has(key)) failed.set(key, "data/" + key + ".js");
      const callbacks = pending.get(key);
      pending.delete(key);
      script.remove();
      callbacks.forEach((f) => f());
      requestDraw();
    };
    document.head.appendChild(script);
  }

  // Images are decoded before they count as loaded, so the first drawImage does not stall a frame.
  function loadImage(url) {
    if (pictures.has(url)) return pictures.get(url);
    const img = new Image(), entry = {img, state: "loading", waiters: []};
    pictures.set(url, entry);
    const settle = (state) => {
      entry.state = state;
      entry.waiters.splice(0).forEach((f) => f(entry));
      requestDraw();
    };
    img.onload = () => (img.decode ? img.decode() : Promise.resolve()).then(() => settle("ok"), () => settle("ok"));
    img.onerror = () => settle("failed");
    img.src = url;
    return entry;
  }

  function whenImage(entry, f) { if (entry.state === "loading") entry.waiters.push(f); else f(entry); }

  // After the first paint, every grid of the shown maps is loaded in the background, one script at a
  // time, so that zooming finds the next size ready. Each arrival redraws, and the frame calls this again.
  let prefetching = false, prefetched = "";
  function prefetch() {
    const maps = ui.map + "\n" + ui.with;
    if (prefetching || firstPaint === null || prefetched === maps) return;
    const keys = [ui.map, ui.with].flatMap((name) => gridEntries(mapByName(name)).map((e) => e.key));
    const key = keys.find((k) => !grids.has(k) && !failed.has(k));
    if (key === undefined) { prefetched = maps; return; }
    prefetching = true;
    loadGrid(key, () => { prefetching = false; });
  }

  // ---------------------------------------------------------------------------------------------
  // Maps, grid sizes and the world <-> screen transform

  function mapByName(name) { return run && name != null ? run.maps.find((m) => m.name === name) || null : null; }
  function gridEntries(map) { return map ? map.grids : []; }
  function paneMap(pane) { return mapByName(pane.index === 0 ? ui.map : ui.with); }
  function paneSide(pane) { return Math.max(1, Math.min(pane.w, pane.h) - 2 * FIT_MARGIN_PX); }  // at zoom 1

  // The finest size whose cells are at least MIN_CELL_PX on screen; the coarsest when none is, and
  // at zoom 1 (the whole map is the overview, even where a tiny grid's finest size would fit).
  function targetEntry(pane) {
    const entries = gridEntries(paneMap(pane));
    if (!entries.length) return null;
    if (view.zoom <= MIN_ZOOM) return entries[0];
    const side = paneSide(pane) * view.zoom;
    let pick = entries[0];
    for (const e of entries) if (side / e.size >= MIN_CELL_PX) pick = e;
    return pick;
  }

  function drawable(grid) { return !!grid && grid.sprite.state !== "loading"; }

  // The grid a pane draws: its target size once loaded, meanwhile the one it drew before.
  function shownGrid(pane) {
    const entry = targetEntry(pane);
    if (!entry) return null;
    loadGrid(entry.key);
    const grid = grids.get(entry.key), before = pane.grid;
    if (drawable(grid)) return grid;
    return before && before.map === paneMap(pane).name && drawable(before) ? before : null;
  }

  // Pane pixels (CSS px from the pane's top left) <-> world; y grows upwards in the world.
  function scale(pane) { return paneSide(pane) * view.zoom; }
  function toScreenX(pane, wx) { return pane.w / 2 + (wx - view.x) * scale(pane); }
  function toScreenY(pane, wy) { return pane.h / 2 - (wy - view.y) * scale(pane); }
  function toWorldX(pane, sx) { return view.x + (sx - pane.w / 2) / scale(pane); }
  function toWorldY(pane, sy) { return view.y - (sy - pane.h / 2) / scale(pane); }

  function findCell(grid, x, y) {
    return x >= 0 && y >= 0 && x < grid.size && y < grid.size ? grid.index[y * grid.size + x] : -1;
  }

  // Quantised so that a view read back from the URL is exactly the view written (and URLs stay short).
  function placeView(x, y, zoom) {
    view.zoom = Math.round(clamp(zoom, MIN_ZOOM, MAX_ZOOM) * 1e4) / 1e4;
    view.x = Math.round(clamp(x, 0, 1) * 1e6) / 1e6;
    view.y = Math.round(clamp(y, 0, 1) * 1e6) / 1e6;
    requestDraw();
  }

  function setView(x, y, zoom) {
    placeView(x, y, zoom);
    scheduleHash();
  }

  // Zooms by `factor` keeping the world point under pane pixel (sx, sy) where it is.
  function zoomAbout(pane, sx, sy, factor) {
    const wx = toWorldX(pane, sx), wy = toWorldY(pane, sy);
    const zoom = clamp(view.zoom * factor, MIN_ZOOM, MAX_ZOOM), s = paneSide(pane) * zoom;
    setView(wx - (sx - pane.w / 2) / s, wy + (sy - pane.h / 2) / s, zoom);
  }

  function panBy(pane, dx, dy) { setView(view.x - dx / scale(pane), view.y + dy / scale(pane), view.zoom); }

  // ---------------------------------------------------------------------------------------------
  // Per-cell overlays: class tint and linked highlight (computed when they change, not per frame)

  function resolveClass(text) {
    if (!text) return -1;
    const n = Array.isArray(run.classes) ? run.classes.length : Infinity;
    const indexed = /(?:^|\(|\s)#(\d+)\)?\s*$/.exec(text.trim()) || /^(\d+)$/.exec(text.trim());
    if (indexed && +indexed[1] < n) return +indexed[1];  // "#517", "crane (#517)", or a bare index
    for (const names of [classLabels, run.classes]) {
      if (!Array.isArray(names)) continue;
      let i = names.indexOf(text);
      if (i < 0) { const low = text.toLowerCase(); i = names.findIndex((c) => String(c).toLowerCase() === low); }
      if (i >= 0) return i;
    }
    return -1;
  }

  // Each cell's attribution to the filter class over the largest magnitude in the grid: [-1, 1].
  function tintOf(grid) {
    if (grid.tintIndex === ui.clsIndex) return grid.tint;
    grid.tintIndex = ui.clsIndex;
    grid.tint = null;
    if (grid.attr === undefined) grid.attr = grid.raw.attr ? new Int8Array(decodeBase64(grid.raw.attr).buffer) : null;
    const attr = grid.attr, n = grid.raw.n_classes | 0, c = ui.clsIndex;
    if (!attr || c < 0 || c >= n || attr.length < grid.m * n) return null;
    const tint = new Float32Array(grid.m);
    let peak = 0;
    for (let i = 0; i < grid.m; i++) {
      tint[i] = attr[i * n + c];
      peak = Math.max(peak, Math.abs(tint[i]));
    }
    if (peak > 0) for (let i = 0; i < grid.m; i++) tint[i] /= peak;
    grid.tint = tint;
    return tint;
  }

  function cellImages(grid, i) {
    const p = grid.imagePtr;
    return i >= 0 && i + 1 < p.length ? grid.imageIds.subarray(p[i], p[i + 1]) : grid.imageIds.subarray(0, 0);
  }

  // The other pane's cells sharing images with the hovered cell, strength = shared / most shared.
  let linkedCache = {sig: "", pane: -1, strength: null, list: []};
  function linked() {
    const other = hover && panes[1 - hover.pane];
    const grid = other && !other.el.hidden ? other.grid : null;
    const sig = grid ? hover.grid.key + "|" + hover.i + "|" + hover.pane + "|" + grid.key : "";
    if (sig === linkedCache.sig) return linkedCache;
    linkedCache = {sig, pane: grid ? other.index : -1, strength: null, list: []};
    if (!grid || !imageMarks.length) return linkedCache;
    const mine = cellImages(hover.grid, hover.i);
    for (const id of mine) if (id < imageMarks.length) imageMarks[id] = 1;
    const shared = new Float32Array(grid.m);
    let most = 0;
    for (let j = 0; j < grid.m; j++) {
      for (const id of cellImages(grid, j)) shared[j] += imageMarks[id] | 0;
      most = Math.max(most, shared[j]);
    }
    for (const id of mine) if (id < imageMarks.length) imageMarks[id] = 0;
    if (most === 0) return linkedCache;
    for (let j = 0; j < grid.m; j++) {
      shared[j] /= most;
      if (shared[j] > 0) linkedCache.list.push([grid.xy[2 * j], grid.xy[2 * j + 1], shared[j]]);
    }
    linkedCache.list.sort((a, b) => b[2] - a[2]);
    linkedCache.strength = shared;
    return linkedCache;
  }

  // ---------------------------------------------------------------------------------------------
  // Drawing

  function requestDraw() {
    if (needsDraw) return;
    needsDraw = true;
    requestAnimationFrame(drawFrame);
  }

  function drawFrame() {
    needsDraw = false;
    if (!panes.length) return;  // before start()
    for (const pane of panes) if (!pane.el.hidden) drawPane(pane);
    drawMinimap();
    updateReadout();
    refreshPanel();
    frames++;
    prefetch();
  }

  function drawPane(pane) {
    const ctx = pane.ctx, dpr = pane.dpr;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = COLORS.pane;
    ctx.fillRect(0, 0, pane.canvas.width, pane.canvas.height);
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);  // from here on: CSS pixels
    const map = paneMap(pane), grid = map ? shownGrid(pane) : null;
    setText(pane.title, map ? paneTitle(map, grid) : "");
    const message = paneMessage(pane, map, grid);
    setText(pane.msg, message);
    setHidden(pane.msg, !message);
    const changed = pane.grid !== grid;
    pane.grid = grid;
    pane.drawnKey = grid ? grid.key : null;
    // The grid under a still pointer changed (a zoom crossed a size): the tooltip follows it.
    if (changed && pointerAt && pointerAt.pane === pane) updateHover(pane, pointerAt.x, pointerAt.y);
    if (!grid) return;
    const s = scale(pane);
    ctx.fillStyle = COLORS.square;
    ctx.fillRect(toScreenX(pane, 0), toScreenY(pane, 1), s, s);
    const range = visibleRange(pane, grid);
    drawTiles(pane, grid, range);
    const tint = ui.clsIndex >= 0 ? tintOf(grid) : null;
    if (tint) drawTint(pane, grid, range, tint);
    const link = linked();
    if (link.pane === pane.index && link.strength) drawLinked(pane, grid, range, link.strength);
    if (ui.labels) drawLabels(pane, grid, range);
    if (hover && hover.pane === pane.index && hover.grid === grid) {
      outlineCell(pane, grid.size, grid.xy[2 * hover.i], grid.xy[2 * hover.i + 1], COLORS.hover, 2);
    }
    const sel = ui.cell;  // outlined at its own size, which the zoom may have left
    if (sel && sel.pane === pane.index) outlineCell(pane, sel.size, sel.x, sel.y, COLORS.select, 3);
    if (firstPaint === null) firstPaint = performance.now();
  }

  function paneTitle(map, grid) {
    const title = map.title || map.name;
    return grid ? title + " · " + grid.size + "×" + grid.size + (grid.icons ? "" : " · preview tiles") : title;
  }

  function paneMessage(pane, map, grid) {
    if (!map) return run.maps.length ? "" : "This run has no maps.";
    if (!map.grids.length) return "This map has no grids.";
    if (!grid) {
      const key = targetEntry(pane).key;
      return failed.has(key) ? "Could not load " + failed.get(key) + "." : "Loading…";
    }
    return grid.m === 0 ? "The " + grid.size + "×" + grid.size + " grid of this map has no cells." : "";
  }

  // Columns and rows of the grid on screen (inclusive), clamped to the grid.
  function visibleRange(pane, grid) {
    const n = grid.size, cell = (w) => clamp(Math.floor(w * n), 0, n - 1);
    return {
      x0: cell(toWorldX(pane, 0)), x1: cell(toWorldX(pane, pane.w)),
      y0: cell(toWorldY(pane, pane.h)), y1: cell(toWorldY(pane, 0)),
    };
  }

  // Calls f(i, left, top, width, height) for each visible kept cell, edges rounded to device pixels
  // so that neighbouring tiles meet without seams. Row y is drawn top-down as N-1-y (y grows upwards).
  function forVisibleCells(pane, grid, r, f) {
    const n = grid.size, s = scale(pane) / n, dpr = pane.dpr;
    const ox = toScreenX(pane, 0), oy = toScreenY(pane, 0);
    for (let y = r.y0; y <= r.y1; y++) {
      const top = Math.round((oy - (y + 1) * s) * dpr) / dpr, bottom = Math.round((oy - y * s) * dpr) / dpr;
      for (let x = r.x0; x <= r.x1; x++) {
        const i = grid.index[y * n + x];
        if (i < 0) continue;
        const left = Math.round((ox + x * s) * dpr) / dpr, right = Math.round((ox + (x + 1) * s) * dpr) / dpr;
        f(i, left, top, right - left, bottom - top);
      }
    }
  }

  // Cell i's tile from the sprite sheet; a grey box when the sheet could not be loaded. The source is
  // inset by half a pixel so that scaling never samples the neighbouring tile.
  function drawTile(ctx, grid, i, left, top, w, h) {
    const tile = grid.tile, cols = grid.cols;
    if (grid.sprite.state !== "ok") { ctx.fillStyle = COLORS.missing; ctx.fillRect(left, top, w, h); return; }
    ctx.drawImage(grid.sprite.img, (i % cols) * tile + 0.5, Math.floor(i / cols) * tile + 0.5, tile - 1, tile - 1,
      left, top, w, h);
  }

  function drawTiles(pane, grid, range) {
    const ctx = pane.ctx, count = grid.count, maxCount = grid.maxCount, density = ui.density;
    forVisibleCells(pane, grid, range, (i, left, top, w, h) => {
      if (density) {  // icon side follows the cell's sample count, centred
        const f = 0.3 + 0.7 * Math.sqrt(Math.min(1, (count[i] || 0) / maxCount));
        left += w * (1 - f) / 2; top += h * (1 - f) / 2; w *= f; h *= f;
      }
      drawTile(ctx, grid, i, left, top, w, h);
    });
  }

  function drawTint(pane, grid, range, tint) {
    const ctx = pane.ctx;
    forVisibleCells(pane, grid, range, (i, left, top, w, h) => {
      if (tint[i] === 0) return;
      ctx.globalAlpha = 0.55 * Math.abs(tint[i]);  // the icon stays visible under the strongest tint
      ctx.fillStyle = tint[i] > 0 ? COLORS.positive : COLORS.negative;
      ctx.fillRect(left, top, w, h);
    });
    ctx.globalAlpha = 1;
  }

  function drawLinked(pane, grid, range, strength) {
    const ctx = pane.ctx;
    forVisibleCells(pane, grid, range, (i, left, top, w, h) => {
      const s = strength[i];
      if (!(s > 0)) return;
      const width = 1.5 + 4 * s, inset = width / 2 + 1;  // thicker and more opaque for more shared images
      ctx.globalAlpha = 0.45 + 0.55 * s;
      for (const [color, line] of [[COLORS.shadow, width + 2], [COLORS.linked, width]]) {
        ctx.strokeStyle = color;
        ctx.lineWidth = line;
        ctx.strokeRect(left + inset, top + inset, w - 2 * inset, h - 2 * inset);
      }
    });
    ctx.globalAlpha = 1;
  }

  // Each cell's top attributed class (or, without attribution, its most frequent label) as small text.
  function drawLabels(pane, grid, range) {
    const side = scale(pane) / grid.size;
    if (side < LABEL_MIN_PX) return;
    const ctx = pane.ctx, px = Math.round(clamp(side / 6, 9, 13));
    const topClass = grid.raw.top_class, mix = grid.raw.label_mix;
    ctx.font = px + "px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    forVisibleCells(pane, grid, range, (i, left, top, w, h) => {
      const c = grid.k ? topClass[i * grid.k] : mix && mix[i] && mix[i][0] ? mix[i][0][0] : null;
      if (c == null) return;
      ctx.fillStyle = COLORS.labelBar;
      ctx.fillRect(left, top + h - px - 4, w, px + 4);
      ctx.fillStyle = COLORS.labelText;
      ctx.fillText(className(c), left + 2, top + h - px / 2 - 2, w - 4);  // maxWidth squeezes long names
    });
  }

  function outlineCell(pane, size, x, y, color, width) {
    const ctx = pane.ctx, s = scale(pane) / size;
    const left = toScreenX(pane, x / size), top = toScreenY(pane, (y + 1) / size);
    ctx.lineWidth = width;
    ctx.strokeStyle = COLORS.shadow;
    ctx.strokeRect(left - width, top - width, s + 2 * width, s + 2 * width);
    ctx.strokeStyle = color;
    ctx.strokeRect(left, top, s, s);
  }

  function updateReadout() {
    const entry = targetEntry(panes[0]);
    const size = entry ? entry.size + "×" + entry.size + " · " : "";
    setText(byId("readout"), size + "zoom " + view.zoom.toFixed(1) + "×");
  }

  // ---------------------------------------------------------------------------------------------
  // Minimap: the main map's coarsest loaded grid (painted once into a cached canvas) and the viewport

  const minimap = {canvas: null, ctx: null, picture: null, key: ""};

  function drawMinimap() {
    const {canvas, ctx} = minimap, map = mapByName(ui.map);
    setHidden(canvas, !map || !map.grids.length);
    if (canvas.hidden) return;
    const dpr = window.devicePixelRatio || 1, px = Math.round((canvas.clientWidth || 150) * dpr);
    if (canvas.width !== px) canvas.width = canvas.height = px;
    const grid = map.grids.map((e) => grids.get(e.key)).find(drawable);
    if (grid && minimap.key !== grid.key + "@" + px) paintMinimapPicture(grid, px);
    ctx.fillStyle = COLORS.square;
    ctx.fillRect(0, 0, px, px);
    if (grid) ctx.drawImage(minimap.picture, 0, 0);
    const p = panes[0];  // the viewport: the main pane's visible world rectangle
    const x0 = toWorldX(p, 0), x1 = toWorldX(p, p.w), y0 = toWorldY(p, p.h), y1 = toWorldY(p, 0);
    ctx.lineWidth = 2 * dpr;
    ctx.strokeStyle = COLORS.select;
    ctx.strokeRect(x0 * px, (1 - y1) * px, (x1 - x0) * px, (y1 - y0) * px);
  }

  function paintMinimapPicture(grid, px) {
    const picture = minimap.picture || document.createElement("canvas");
    picture.width = picture.height = px;
    const ctx = picture.getContext("2d"), s = px / grid.size;
    for (let i = 0; i < grid.m; i++) {
      const x = grid.xy[2 * i], row = grid.size - 1 - grid.xy[2 * i + 1];  // the top row is the highest y
      drawTile(ctx, grid, i, x * s, row * s, s, s);
    }
    minimap.picture = picture;
    minimap.key = grid.key + "@" + px;
  }

  function minimapPointer(e) {
    if (!(e.buttons & 1)) return;
    const rect = minimap.canvas.getBoundingClientRect();
    setView((e.clientX - rect.left) / rect.width, 1 - (e.clientY - rect.top) / rect.height, view.zoom);
  }

  // ---------------------------------------------------------------------------------------------
  // Hover and tooltip

  const tooltip = {node: null, w: 0, h: 0};

  function paneAt(pane, clientX, clientY) {
    const rect = pane.canvas.getBoundingClientRect();
    return {sx: clientX - rect.left, sy: clientY - rect.top};
  }

  function cellUnder(pane, clientX, clientY) {
    const grid = pane.grid, map = paneMap(pane);
    if (pane.el.hidden || !grid || !map || grid.map !== map.name) return null;
    const {sx, sy} = paneAt(pane, clientX, clientY);
    if (sx < 0 || sy < 0 || sx >= pane.w || sy >= pane.h) return null;
    const n = grid.size, i = findCell(grid, Math.floor(toWorldX(pane, sx) * n), Math.floor(toWorldY(pane, sy) * n));
    return i >= 0 ? {pane: pane.index, grid, i} : null;
  }

  function setHover(next) {
    const same = next && hover && next.grid === hover.grid && next.i === hover.i && next.pane === hover.pane;
    if (same || (!next && !hover)) return;
    hover = next;
    setHidden(tooltip.node, !hover);  // shown before filling: a hidden box measures 0 x 0
    if (hover) {
      tooltip.node.replaceChildren(...cellFacts(hover.grid, hover.i, true));
      tooltip.w = tooltip.node.offsetWidth;  // measured once per cell, not per mouse move
      tooltip.h = tooltip.node.offsetHeight;
    }
    requestDraw();
  }

  function updateHover(pane, clientX, clientY) {
    pointerAt = {pane, x: clientX, y: clientY};
    setHover(cellUnder(pane, clientX, clientY));
    if (!hover) return;
    const gap = 16;  // beside the pointer, flipped to the other side near the window's edges
    let left = clientX + gap, top = clientY + gap;
    if (left + tooltip.w > window.innerWidth - 4) left = clientX - gap - tooltip.w;
    if (top + tooltip.h > window.innerHeight - 4) top = clientY - gap - tooltip.h;
    tooltip.node.style.transform = "translate(" + Math.max(4, left) + "px," + Math.max(4, top) + "px)";
  }

  // The facts shown for a cell, in the tooltip (compact, with a title) and in the panel.
  function cellFacts(grid, i, compact) {
    const raw = grid.raw, out = [];
    if (compact) {
      const where = "cell (" + grid.xy[2 * i] + ", " + grid.xy[2 * i + 1] + ") · " + grid.size + "×" + grid.size;
      out.push(el("div", "tt-title", where + (grid.icons ? "" : " · preview")));
    }
    out.push(el("div", "facts-count", (grid.count[i] || 0) + " samples"));
    out.push(el("div", "facts-head", "top attributed classes"));
    if (grid.k) {
      const table = el("table", "facts-classes");
      for (let j = 0; j < Math.min(grid.k, 5); j++) {
        const v = raw.top_attr ? raw.top_attr[i * grid.k + j] : null, row = el("tr");
        row.append(el("td", "name", className(raw.top_class[i * grid.k + j])),
          el("td", "value " + (v < 0 ? "neg" : "pos"), attrText(v)));
        table.append(row);
      }
      out.push(table);
    } else out.push(el("div", "facts-none", "no attribution"));
    out.push(el("div", "facts-head", "labels of its images"));
    const mix = (raw.label_mix && raw.label_mix[i]) || [], list = el("div", "facts-mix");
    for (const [label, n] of mix) list.append(el("span", "mix", className(label) + " ×" + n));
    out.push(mix.length ? list : el("div", "facts-none", "none"));
    const cos = raw.cosine ? raw.cosine[i] : null, memberCos = raw.member_cosine ? raw.member_cosine[i] : null;
    const iconText = grid.icons && cos != null ? "icon cosine " + num(cos, 3) : "preview tile (no icon)";
    out.push(el("div", "facts-cos", iconText + " · members' median " + num(memberCos, 3)));
    return out;
  }

  // ---------------------------------------------------------------------------------------------
  // Side panel: the selected cell's icon, members and inspect command

  const panel = {node: null, shownSig: ""};

  function selectCell(hit) {
    const xy = hit && hit.grid.xy;
    ui.cell = hit ? {pane: hit.pane, size: hit.grid.size, x: xy[2 * hit.i], y: xy[2 * hit.i + 1]} : null;
    writeHash();
    requestDraw();
    refreshPanel();
  }

  // Shows the panel for ui.cell once its grid has arrived (a URL may name it before the data come),
  // and drops a selection that names no cell.
  function refreshPanel() {
    const sel = ui.cell, map = sel && paneMap(panes[sel.pane]);
    const entry = map && map.grids.find((e) => e.size === sel.size);
    if (entry) loadGrid(entry.key);
    const grid = entry && grids.get(entry.key);
    if (entry && !grid && !failed.has(entry.key)) return;  // still loading
    const i = grid ? findCell(grid, sel.x, sel.y) : -1;
    if (i < 0) {
      if (sel) { ui.cell = null; writeHash(); requestDraw(); }
      panel.shownSig = "";
      setHidden(panel.node, true);
      return;
    }
    const sig = map.name + "|" + sel.size + "|" + sel.x + "," + sel.y;
    if (sig !== panel.shownSig) { panel.shownSig = sig; fillPanel(map, grid, i); }
    setHidden(panel.node, false);
  }

  function fillPanel(map, grid, i) {
    const x = grid.xy[2 * i], y = grid.xy[2 * i + 1];
    setText(byId("panel-title"), map.title || map.name);
    const where = "cell (" + x + ", " + y + ") of the " + grid.size + "×" + grid.size + " grid";
    setText(byId("panel-sub"), where + (grid.icons ? "" : " · preview tile"));
    const icon = byId("panel-icon");
    whenImage(grid.sprite, () => drawTile(icon.getContext("2d"), grid, i, 0, 0, icon.width, icon.height));
    byId("panel-facts").replaceChildren(...cellFacts(grid, i, false));
    const members = (grid.raw.members && grid.raw.members[i]) || [];
    byId("panel-members").replaceChildren(...members.map((member) => memberFigure(grid, member)));
    if (!members.length) byId("panel-members").append(el("p", "facts-none", "no members"));
    const command = (run.inspect || "atlas inspect RUN") + " --layer " + shellWord(map.name) +
      " --grid " + grid.size + " --cell " + x + " " + y;
    setText(byId("panel-command"), command);
  }

  // One member: its receptive-field patch (a grey box when its image could not be read), name, cosine.
  function memberFigure(grid, [image, patch, cos]) {
    const spec = run.patch || {}, tile = spec.tile || 64, cols = spec.cols || 16, per = spec.per_sheet || 256;
    const figure = el("figure", "member"), canvas = el("canvas", "patch"), caption = el("figcaption");
    canvas.width = canvas.height = tile;
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = COLORS.missing;
    ctx.fillRect(0, 0, tile, tile);
    if (patch >= 0) {
      const slot = patch % per;
      whenImage(loadImage("patches/" + Math.floor(patch / per) + ".jpg"), (entry) => {
        if (entry.state !== "ok") return;
        ctx.drawImage(entry.img, (slot % cols) * tile, Math.floor(slot / cols) * tile, tile, tile, 0, 0, tile, tile);
      });
    } else canvas.title = "the image could not be read";
    caption.append(el("span", "member-name", imageName(grid, image)), el("span", "member-cos", "cos " + num(cos, 3)));
    figure.title = imagePath(grid, image) || "";
    figure.append(canvas, caption);
    return figure;
  }

  // ---------------------------------------------------------------------------------------------
  // URL hash: map, view, selected cell, class, second map, toggles

  let hashTimer = null, lastHashWrite = 0, lastHash = "";

  function hashText() {
    const parts = [["map", ui.map], ["x", view.x], ["y", view.y], ["z", view.zoom]];
    if (ui.cell) {
      // grid: the selected cell's size, which the zoom may since have left
      parts.push(["cell", ui.cell.x + "," + ui.cell.y], ["grid", ui.cell.size]);
      if (ui.cell.pane === 1) parts.push(["cellin", 1]);
    }
    if (ui.cls) parts.push(["class", ui.cls]);
    if (ui.with) parts.push(["with", ui.with]);
    parts.push(["density", ui.density ? 1 : 0], ["labels", ui.labels ? 1 : 0]);
    return parts.filter((p) => p[1] != null).map((p) => p[0] + "=" + encodeURIComponent(String(p[1]))).join("&");
  }

  function writeHash() {
    clearTimeout(hashTimer);
    hashTimer = null;
    lastHashWrite = performance.now();
    lastHash = "#" + hashText();
    if (location.hash === lastHash) return;
    try { history.replaceState(history.state, "", lastHash); } catch (err) { /* sandboxed frames may refuse */ }
  }

  // Continuous changes (pan, zoom) are throttled; the last one is always written.
  function scheduleHash() {
    const wait = HASH_WRITE_MS - (performance.now() - lastHashWrite);
    if (wait <= 0) writeHash();
    else if (hashTimer === null) hashTimer = setTimeout(writeHash, wait);
  }

  function parseHash(text) {
    const out = {};
    // "+" as a space, as form encoding (Python's urlencode) writes it; encodeURIComponent writes "%2B"
    for (const part of text.replace(/^#/, "").replace(/\+/g, " ").split("&")) {
      const eq = part.indexOf("=");
      try {
        if (eq > 0) out[decodeURIComponent(part.slice(0, eq))] = decodeURIComponent(part.slice(eq + 1));
      } catch (err) { /* a mangled value is ignored */ }
    }
    return out;
  }

  function finite(text, fallback) { const v = parseFloat(text); return isFinite(v) ? v : fallback; }

  // The URL is left as given (it is rewritten on the next change), so a hash-driven view costs no history call.
  function applyHash(text) {
    const h = parseHash(text);
    ui.map = mapByName(h.map) ? h.map : run.maps.length ? run.maps[0].name : null;
    ui.with = mapByName(h.with) ? h.with : null;
    ui.density = h.density === "1";
    ui.labels = h.labels === "1";
    setClass(h.class);
    setHidden(panes[1].el, !ui.with);
    resizePanes();
    placeView(finite(h.x, 0.5), finite(h.y, 0.5), finite(h.z, 1));
    const xy = /^(-?\d+),(-?\d+)$/.exec(h.cell || ""), pane = h.cellin === "1" && ui.with ? 1 : 0;
    const size = h.grid ? parseInt(h.grid, 10) : (targetEntry(panes[pane]) || {}).size;  // no grid: the zoom's
    ui.cell = xy && ui.map ? {pane, size, x: +xy[1], y: +xy[2]} : null;
    syncControls();
    setHover(null);
    panel.shownSig = "";
    refreshPanel();
  }

  // ---------------------------------------------------------------------------------------------
  // Controls

  function setClass(text) {
    ui.clsIndex = resolveClass(text);
    ui.cls = ui.clsIndex >= 0 ? className(ui.clsIndex) : null;
    requestDraw();
  }

  function syncControls() {
    byId("map").value = ui.map || "";
    byId("with").value = ui.with || "";
    byId("density").checked = ui.density;
    byId("labels").checked = ui.labels;
    const input = byId("class");
    if (resolveClass(input.value.trim()) !== ui.clsIndex) input.value = ui.cls || "";
    input.classList.toggle("unknown", !!input.value && ui.clsIndex < 0);
  }

  function fillSelects() {
    for (const select of [byId("map"), byId("with")]) {
      for (const map of run.maps) {
        const indent = map.kind && map.kind !== "layer" ? "\u00a0\u00a0\u00a0" : "";  // focus maps under their layer
        select.append(new Option(indent + (map.title || map.name), map.name));
      }
      select.disabled = !run.maps.length;
    }
  }

  // 1000 <option>s cost a few ms: built after the first paint.
  function fillClassList() {
    const names = run.classes;
    if (Array.isArray(names)) byId("class-list").replaceChildren(...classLabels.map((n) => new Option(n)));
    else byId("class").placeholder = "class index, e.g. #12";
  }

  function bindControls() {
    byId("map").addEventListener("change", (e) => {
      ui.map = e.target.value;
      ui.cell = null;  // a selection belongs to its map; a new map starts whole
      setHover(null);
      setView(0.5, 0.5, 1);
      writeHash();
    });
    byId("with").addEventListener("change", (e) => {
      ui.with = e.target.value || null;
      if (ui.cell && ui.cell.pane === 1) ui.cell = null;
      setHidden(panes[1].el, !ui.with);
      setHover(null);
      resizePanes();
      writeHash();
    });
    const onClass = (e) => { setClass(e.target.value.trim()); syncControls(); writeHash(); };
    byId("class").addEventListener("input", onClass);
    byId("class").addEventListener("change", onClass);
    byId("density").addEventListener("change", (e) => { ui.density = e.target.checked; requestDraw(); writeHash(); });
    byId("labels").addEventListener("change", (e) => { ui.labels = e.target.checked; requestDraw(); writeHash(); });
    byId("panel-close").addEventListener("click", () => selectCell(null));
    window.addEventListener("hashchange", () => { if (location.hash !== lastHash) applyHash(location.hash); });
    window.addEventListener("keydown", onKey);
    window.addEventListener("resize", resizePanes);
  }

  // ---------------------------------------------------------------------------------------------
  // Input: drag, pinch, wheel, click, keys

  function capture(node, e) {
    try { node.setPointerCapture(e.pointerId); } catch (err) { /* synthetic pointers cannot be captured */ }
  }

  function bindPane(pane) {
    const pointers = new Map();  // pointerId -> last client position
    let press = null;  // {x, y, moved, multi}: the gesture since the first pointer went down
    const canvas = pane.canvas;
    canvas.addEventListener("pointerdown", (e) => {
      capture(canvas, e);
      pointers.set(e.pointerId, {x: e.clientX, y: e.clientY});
      if (pointers.size === 1) press = {x: e.clientX, y: e.clientY, moved: false, multi: false};
      else press.multi = true;
      setHover(null);
    });
    canvas.addEventListener("pointermove", (e) => {
      const last = pointers.get(e.pointerId);
      if (!last) { updateHover(pane, e.clientX, e.clientY); return; }
      if (Math.hypot(e.clientX - press.x, e.clientY - press.y) > CLICK_SLOP_PX) press.moved = true;
      if (pointers.size === 1) panBy(pane, e.clientX - last.x, e.clientY - last.y);
      else if (pointers.size === 2) pinch(pane, pointers, e);
      pointers.set(e.pointerId, {x: e.clientX, y: e.clientY});
    });
    const release = (e) => {
      if (!pointers.delete(e.pointerId) || pointers.size) return;
      if (e.type === "pointerup" && !press.moved && !press.multi) selectCell(cellUnder(pane, e.clientX, e.clientY));
      press = null;
    };
    canvas.addEventListener("pointerup", release);
    canvas.addEventListener("pointercancel", release);
    canvas.addEventListener("pointerleave", () => { pointerAt = null; if (!pointers.size) setHover(null); });
    canvas.addEventListener("wheel", (e) => {
      e.preventDefault();
      const unit = e.deltaMode === 1 ? 16 : e.deltaMode === 2 ? 400 : 1;  // lines and pages to pixels
      const {sx, sy} = paneAt(pane, e.clientX, e.clientY);
      zoomAbout(pane, sx, sy, Math.exp(-e.deltaY * unit * 0.002));
      updateHover(pane, e.clientX, e.clientY);
    }, {passive: false});
  }

  // Two pointers: zoom by the change of their distance about their midpoint, and pan with it.
  function pinch(pane, pointers, e) {
    const before = pointers.get(e.pointerId);
    const other = [...pointers].find(([id]) => id !== e.pointerId)[1];
    const distBefore = Math.hypot(before.x - other.x, before.y - other.y);
    const distAfter = Math.hypot(e.clientX - other.x, e.clientY - other.y);
    const midBefore = paneAt(pane, (before.x + other.x) / 2, (before.y + other.y) / 2);
    const midAfter = paneAt(pane, (e.clientX + other.x) / 2, (e.clientY + other.y) / 2);
    if (distBefore > 0) zoomAbout(pane, midBefore.sx, midBefore.sy, distAfter / distBefore);
    panBy(pane, midAfter.sx - midBefore.sx, midAfter.sy - midBefore.sy);
  }

  // Keys typed into the class box or a select are theirs (a select changes with the arrows).
  function keyBelongsToControl(e) {
    const t = e.target, tag = t && t.tagName;
    if (tag === "INPUT") return t.type !== "checkbox";
    return tag === "SELECT" || tag === "TEXTAREA" || !!(t && t.isContentEditable);
  }

  function onKey(e) {
    if (e.key === "Escape") { selectCell(null); return; }
    if (keyBelongsToControl(e) || e.ctrlKey || e.metaKey || e.altKey) return;
    const step = KEY_PAN / view.zoom, x = view.x, y = view.y, z = view.zoom;
    const move = {
      ArrowLeft: [x - step, y, z], ArrowRight: [x + step, y, z], ArrowUp: [x, y + step, z], ArrowDown: [x, y - step, z],
      "+": [x, y, z * KEY_ZOOM], "=": [x, y, z * KEY_ZOOM], "-": [x, y, z / KEY_ZOOM], _: [x, y, z / KEY_ZOOM],
      0: [0.5, 0.5, 1],
    }[e.key];
    if (!move) return;
    e.preventDefault();
    setView(move[0], move[1], move[2]);
    setHover(null);
  }

  // ---------------------------------------------------------------------------------------------
  // Panes and startup

  function makePane(index) {
    const node = byId("pane" + index), canvas = node.querySelector("canvas.map");
    const pane = {
      index, el: node, canvas, ctx: canvas.getContext("2d", {alpha: false}),
      title: node.querySelector(".pane-title"), msg: node.querySelector(".pane-msg"),
      w: 1, h: 1, dpr: 1, grid: null, drawnKey: null,
    };
    bindPane(pane);
    return pane;
  }

  // Canvas backing store = CSS size x devicePixelRatio, so tiles stay sharp on high-density screens.
  function resizePanes() {
    const dpr = window.devicePixelRatio || 1;
    for (const pane of panes) {
      const w = Math.max(1, pane.el.clientWidth), h = Math.max(1, pane.el.clientHeight);
      if (pane.el.hidden || (w === pane.w && h === pane.h && dpr === pane.dpr)) continue;
      Object.assign(pane, {w, h, dpr});
      pane.canvas.width = Math.round(w * dpr);
      pane.canvas.height = Math.round(h * dpr);
    }
    requestDraw();
  }

  function start() {
    panes.push(makePane(0), makePane(1));
    tooltip.node = byId("tooltip");
    panel.node = byId("panel");
    minimap.canvas = byId("minimap");
    minimap.ctx = minimap.canvas.getContext("2d");
    minimap.canvas.addEventListener("pointerdown", (e) => { capture(minimap.canvas, e); minimapPointer(e); });
    minimap.canvas.addEventListener("pointermove", minimapPointer);
    setText(byId("title"), (run.title || "atlas") + (run.model ? " · " + run.model : ""));
    document.title = "atlas · " + (run.title || "");
    fillSelects();
    bindControls();
    applyHash(location.hash);
    if (window.ResizeObserver) {  // the panel and the second pane change the panes' sizes, not the window's
      const observer = new ResizeObserver(resizePanes);
      panes.forEach((pane) => observer.observe(pane.el));
    }
    setTimeout(fillClassList, 50);
  }

  // Without data/run.js the page says how to make it instead of staying blank.
  window.addEventListener("load", () => {
    if (run) return;
    const msg = document.querySelector("#pane0 .pane-msg");
    msg.textContent = "No atlas data here (data/run.js did not load). Make it with `atlas view RUN`.";
    msg.hidden = false;
  });

  window.ATLAS = {run: receiveRun, grid: receiveGrid};

  // ---------------------------------------------------------------------------------------------
  // Test hooks (Playwright): client coordinates are page pixels, cells are [x, y] of the drawn grid

  window.ATLAS_VIEW = {
    state() {
      const entry = panes.length ? targetEntry(panes[0]) : null;
      return {
        map: ui.map, size: entry ? entry.size : null, x: view.x, y: view.y, zoom: view.zoom,
        cell: ui.cell ? [ui.cell.x, ui.cell.y] : null, cls: ui.cls, with: ui.with,
        density: ui.density, labels: ui.labels,
      };
    },
    cellAt(pane, cx, cy) {
      const hit = panes[pane] ? cellUnder(panes[pane], cx, cy) : null;
      return hit ? [hit.grid.xy[2 * hit.i], hit.grid.xy[2 * hit.i + 1]] : null;
    },
    cellCentre(pane, x, y) {
      const p = panes[pane], grid = p && p.grid;
      if (!grid) return null;
      const rect = p.canvas.getBoundingClientRect();
      return [rect.left + toScreenX(p, (x + 0.5) / grid.size), rect.top + toScreenY(p, (y + 0.5) / grid.size)];
    },
    tint(x, y) {
      const grid = panes[0] && panes[0].grid, i = grid ? findCell(grid, x, y) : -1;
      const tint = i >= 0 && ui.clsIndex >= 0 ? tintOf(grid) : null;
      return tint ? tint[i] : 0;
    },
    highlighted() { return linked().list.map((c) => c.slice()); },
    frames() { return frames; },
    ready() {
      return !!run && panes.every((pane) => {
        const entry = pane.el.hidden ? null : targetEntry(pane);
        return !entry || failed.has(entry.key) || (drawable(grids.get(entry.key)) && pane.drawnKey === entry.key);
      });
    },
    firstPaint() { return firstPaint; },
  };
})();
