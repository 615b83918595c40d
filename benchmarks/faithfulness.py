"""How well each map's icons stand for their cells: per map and grid size, the icons' median
cosine to the cell direction against the members' median, and the share of cells whose icon beats
the cell's best member on the atlas objective.

Reads: RUN/grid.h5, RUN/activations.h5 and every RUN/<map>/icons-<N>/icons.json (icons.json
records each icon's objective and cosine, measured on its 8-bit pixels; the members' best
objective is computed here from the activations, so icons rendered before it was recorded count
too). Writes: nothing. Icons from another grid or config are read all the same (the cells must be
the grid's), so a copy of a run can be compared before and after a re-render.

    .venv/bin/python benchmarks/faithfulness.py data/runs/demo [--icons OTHER_RUN]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's atlas, not an installed one

from atlas.config import load_config  # noqa: E402
from atlas.render import best_member_objectives, member_cosines  # noqa: E402
from atlas.store import Run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--icons", type=Path, default=None, help="read the icons from this run instead (same grid)")
    args = parser.parse_args()
    config = load_config(args.run)
    store = Run(config.run_dir, config)
    icons_root = Run((args.icons or args.run).resolve(), config)
    print(f"{'map':<44}{'N':>4}{'px':>5}{'steps':>7}{'icons cos':>11}{'members cos':>13}{'icons >= members':>18}"
          f"{'beats best member':>19}")
    with store.activations("render") as acts:
        for spec in store.maps():
            for size in config.render.sizes_of(spec.name, config.grid.sizes):
                path = icons_root.icons_dir(spec.name, size) / "icons.json"
                if not path.is_file():
                    continue
                meta = json.loads(path.read_text())
                grid = store.grid(spec.name, size)
                order = [grid.find(*e["cell"]) for e in meta["icons"]]
                layer_acts = acts.layer(spec.layer).acts
                (member_cos,) = member_cosines(layer_acts, [grid])
                vectors = grid.direction_whitened if config.render.whiten else grid.direction
                (best,) = best_member_objectives(layer_acts, [grid], [vectors], config.render.cos_power)
                cos = np.array([e["cosine"] for e in meta["icons"]])
                objective = np.array([e["objective"] for e in meta["icons"]])
                steps = np.mean([e["steps"] for e in meta["icons"]])
                icons_med, members_med = float(np.median(cos)), float(np.median(member_cos))
                print(f"{spec.name:<44}{size:>4}{meta['icon_size']:>5}{steps:>7.0f}{icons_med:>11.3f}{members_med:>13.3f}"
                      f"{'yes' if icons_med >= members_med else 'NO':>18}{np.mean(objective > best[order]):>19.0%}")


if __name__ == "__main__":
    main()
