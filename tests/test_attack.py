"""`atlas attack`: placements, flip counting and controls on a model with hand-set weights, and the
command end to end on a toy run with its one-line errors.

The model (`tiny:colour`) classifies an 8 x 8 image by its mean colour: logits 10 x (mean red,
mean blue, mean green), 2 and 0, so every verdict below can be worked out by hand. A = class 0
(red), B = class 1 (blue), class 2 = green, class 3 = dark.
"""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import colour
from toy_runs import toy_config, write_activations, write_icons

from atlas import grid as grid_mod
from atlas.attack import (Placement, flip_counts, noise_patches, outcome, paste, placements, random_cells, top_cells,
                          try_patches)
from atlas.cli import main
from atlas.config import save_config
from atlas.errors import AtlasError
from atlas.focus import MapSpec
from atlas.store import Layout, MapLayout, Run
from atlas.store.fingerprints import layout_fingerprint

NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead"]
RED, BLUE, WEAK_BLUE, GREEN, BLACK = (255, 0, 0), (0, 0, 255), (0, 0, 160), (0, 255, 0), (0, 0, 0)


def corpus() -> np.ndarray:
    """(5, 8, 8, 3) uint8: red; red in columns 0-4 and black in 5-7; green; blue; black."""
    images = np.zeros((5, 8, 8, 3), np.uint8)
    images[0] = RED
    images[1, :, :5] = RED
    images[2] = GREEN
    images[3] = BLUE
    return images


def solid(rgb, px: int = 8) -> np.ndarray:
    return np.full((px, px, 3), rgb, np.uint8)


def predict(pixels: np.ndarray) -> np.ndarray:
    """The hand-set model on uint8 pixels, as probabilities."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return torch.softmax(colour()(x), dim=1).numpy()


# ---------------------------------------------------------------------------------------------
# Pure core


def test_placements_put_the_static_one_among_every_corner_and_size():
    where, static = placements((0.75, 0.5), Placement("bottom-right", 0.5))
    assert len(where) == 8 and where[static] == Placement("bottom-right", 0.5)
    assert [p.size for p in where] == [0.5] * 4 + [0.75] * 4
    where, static = placements((0.2,), Placement("top-left", 0.3))
    assert len(where) == 8 and where[static] == Placement("top-left", 0.3)
    with pytest.raises(AtlasError, match="in \\(0, 1\\], got 1.5"):
        placements((1.5,), Placement("top-left", 0.3))
    with pytest.raises(AtlasError, match="unknown corner 'middle'"):
        placements((0.5,), Placement("middle", 0.3))


def test_paste_covers_the_corner_square_only():
    image = solid(RED)
    patch = np.arange(12, dtype=np.uint8).reshape(2, 2, 3) * 20  # resized from 2 to 4 px
    for corner, (top, left) in {"top-left": (0, 0), "top-right": (0, 4), "bottom-left": (4, 0),
                                "bottom-right": (4, 4)}.items():
        out = paste(image, patch, Placement(corner, 0.5))
        changed = (out != image).any(axis=2)
        expected = np.zeros((8, 8), bool)
        expected[top:top + 4, left:left + 4] = True
        np.testing.assert_array_equal(changed, expected)
    np.testing.assert_array_equal(paste(image, solid(BLUE, 64), Placement("top-left", 0.75))[:6, :6], solid(BLUE, 6))
    assert (image == RED).all()  # the input is not changed


def test_the_hand_set_model_sees_what_the_tests_assume():
    clean = outcome(predict(corpus()), 1)
    assert clean.top1.tolist() == [0, 0, 2, 1, 3]


def test_flip_counting_and_controls_on_the_hand_set_model():
    images = corpus()
    where, static = placements((0.5, 0.75), Placement("bottom-right", 0.5))  # 4 px or 6 px squares
    clean = outcome(predict(images), 1)
    victims = np.flatnonzero(clean.top1 == 0)  # the two red images
    assert victims.tolist() == [0, 1]
    before = outcome(predict(images[victims]), 1)
    everyone = np.ones(2, bool)
    kinds = {"icons": [solid(BLUE), solid(WEAK_BLUE)], "random cells": [solid(GREEN), solid(GREEN)],
             "noise": noise_patches(2, 8, np.random.default_rng(0))}
    found = {}
    for kind, patches in kinds.items():
        after = try_patches(predict, images[victims], patches, where, 1, batch_size=5)
        assert after.top1.shape == (2, 8, 2)
        universal = try_patches(predict, images, patches, [where[static]], 1, batch_size=3)
        found[kind] = (flip_counts(before, after, everyone, 1, static), flip_counts(before, after, everyone, 1),
                       flip_counts(clean, universal, clean.top1 != 1, 1, 0))
    static_, dynamic, universal = found["icons"]
    # A 4 px square of blue (a quarter of the image) never outweighs the red; a 6 px one (36 of
    # 64 pixels) does: full blue on both red images, the weaker blue (0.63 x 36/64 = 0.35) only
    # where it covers enough red (image 1: red 22/64 = 0.34 or less at every corner; image 0: 0.44).
    assert static_["flips"].tolist() == [0, 0] and static_["rate"] == 0.0
    assert dynamic["flips"].tolist() == [2, 1] and dynamic["rate"] == 0.75 and dynamic["images"] == 2
    # Universal: of the 4 images not blue, only the black one turns blue under the full-blue 4 px
    # square (2.5 > its 2.0); the weaker blue (1.57) does not.
    assert universal["images"] == 4 and universal["flips"].tolist() == [1, 0] and universal["rate"] == 1 / 8
    # Green turns red images green at 6 px (class 2), which is no flip to B; noise flips nothing.
    for kind in ("random cells", "noise"):
        assert [int(c["flips"].sum()) for c in found[kind]] == [0, 0, 0], kind
    green = try_patches(predict, images[victims], kinds["random cells"], where, 1)
    assert (green.top1[:, where.index(Placement("top-left", 0.75)), 0] == 2).all()
    # B's probability: the best placement is at least the static one, and both exceed the clean one.
    assert dynamic["target_after"] >= static_["target_after"] > static_["target_before"]
    assert static_["target_before"] == pytest.approx(float(before.target_p.mean()))


def test_a_flip_needs_B_not_just_another_class():
    before = outcome(np.array([[0.9, 0.05, 0.05]]), 1)
    after = outcome(np.array([[[[0.1, 0.2, 0.7]], [[0.1, 0.6, 0.3]]]]), 1)  # (1 patch, 2 placements, 1 image)
    assert flip_counts(before, after, np.array([True]), 1, 0)["flips"].tolist() == [0]
    assert flip_counts(before, after, np.array([True]), 1)["flips"].tolist() == [1]
    assert flip_counts(before, after, np.array([False]), 1)["rate"] is None


def test_top_and_random_cells():
    attr = np.array([[0.1, 0.0], [0.5, -0.2], [0.5, 0.3], [-0.1, 0.9], [0.0, 0.1]])
    assert top_cells(attr, 0, 3).tolist() == [1, 2, 0]  # ties: the earlier cell first
    assert top_cells(attr, 0, 10).tolist() == [1, 2, 0]  # only positive attribution counts
    assert top_cells(attr, 1, 2).tolist() == [3, 2]
    picked = random_cells(5, np.array([1, 2]), 2, np.random.default_rng(0))
    assert len(picked) == 2 and not set(picked) & {1, 2}
    assert random_cells(5, np.array([1, 2]), 9, np.random.default_rng(0)).tolist() == [0, 3, 4]


# ---------------------------------------------------------------------------------------------
# The command on a toy run: layer `features` of tiny:colour (its map is the pixels), a 2x2 grid
# per map. Cells (0, 0) and (1, 0) hold samples of the blue image and are attributed to goldfish
# (1.0 and 0.5); their icons are full and weak blue. Cells (0, 1) and (1, 1) argue for tench and
# the shark, with green icons.


PAIR = MapSpec("features/pair-tench-goldfish", "features", "pair", (0, 1), ("tench", "goldfish"))
EMPTY_PAIR = MapSpec("features/pair-hammerhead-goldfish", "features", "pair", (4, 1), ("hammerhead", "goldfish"))
CLASS = MapSpec("features/class-goldfish", "features", "class", (1,), ("goldfish",))
ICONS = {(0, 0): BLUE, (1, 0): WEAK_BLUE, (0, 1): GREEN, (1, 1): GREEN}
ARGS = ("--patches", 2, "--size", 0.5, "--sizes", 0.5, 0.75)


@pytest.fixture(scope="module")
def attack_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("attack-run")
    n, images = 40, corpus()
    i = np.arange(n)
    image = i % len(images)
    cluster = np.where(image == 3, (i // 5) % 2, 2 + (i // 5) % 2)
    yx = np.stack([(i // 5) % 8, i % 8], axis=1)
    acts = images[image, yx[:, 0], yx[:, 1]].astype(np.float32) / 255
    attr = np.zeros((n, len(NAMES)), np.float32)
    attr[cluster == 0, 1], attr[cluster == 1, 1], attr[cluster == 2, 0], attr[cluster == 3, 2] = 1.0, 0.5, 1.0, 1.0
    preprocess = {"size": 8, "resize": 8, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    config = toy_config(run_dir, layers=("features",), model="tiny:colour", preprocess=preprocess,
                        layout={"classes": ("goldfish",), "pairs": (("tench", "goldfish"), ("hammerhead", "goldfish"))},
                        grid={"sizes": (2,), "min_count": 1, "top_classes": 3})
    write_activations(run_dir, {"features": acts}, {"features": attr}, n_images=len(images), class_names=NAMES,
                      wnids=[f"n{k:08d}" for k in range(len(NAMES))], config=config,
                      paths=[f"img{k}.png" for k in range(len(images))], labels=[0, 0, 2, 1, 3],
                      yx={"features": yx}, shapes={"features": [3, 8, 8]},
                      preprocess={**preprocess, "interpolation": "bilinear"})
    store = Run(run_dir, config)
    acts_fp = store.activations_fingerprint()
    xy = np.array([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]], np.float32)[cluster]
    specs = [MapSpec("features", "features"), CLASS, PAIR, EMPTY_PAIR]
    maps = {m.name: MapLayout(xy, {"n_samples": n}, None if m.kind == "layer" else np.arange(n)) for m in specs}
    store.write_layout(Layout(maps, layout_fingerprint(config, acts_fp), acts_fp, config, specs))
    (run_dir / "images").mkdir()
    for k, pixels in enumerate(images):
        Image.fromarray(pixels).save(run_dir / "images" / f"img{k}.png")
    save_config(config)
    grid_mod.run(config, log=lambda s: None)
    for spec in specs[1:]:
        write_icons(config, spec.name, store.grid(spec.name, 2), ICONS, layer="features")
    return run_dir


def _attack(run_dir, *argv) -> int:
    """`atlas attack RUN ARGV...` through the command line's main; its exit code."""
    return main(["attack", str(run_dir), *[str(a) for a in argv]])


def test_attack_pair_end_to_end(attack_run, capsys):
    assert _attack(attack_run, "--pair", "tench", "Goldfish", *ARGS) == 0
    out = capsys.readouterr().out
    assert "tench -> goldfish" in out and "atlas icons" in out and "random noise" in out
    info = json.loads((attack_run / "features/pair-tench-goldfish/attack/attack-2.json").read_text())
    assert info["attacked_images"] == ["img0.png", "img1.png"] and info["universal_images"] == 5
    r = info["results"]
    assert [p["cell"] for p in r["icons"]["patches"]] == [[0, 0], [1, 0]]
    assert r["icons"]["static"]["flips"] == [0, 0] and r["icons"]["dynamic"]["flips"] == [2, 1]
    assert r["icons"]["universal"]["flips"] == [1, 0] and r["icons"]["universal"]["images"] == 4
    # Real patches: each cell's best member is a pixel of the blue image, cut to its 1 px field.
    assert [p["image"] for p in r["members"]["patches"]] == ["img3.png", "img3.png"]
    assert r["members"]["dynamic"]["flips"] == [2, 2] and r["members"]["universal"]["flips"] == [1, 1]
    # Like A: the black image (P(tench) 0.09) and the green one, classified neither A nor B. Full blue
    # turns the black one at 4 px and both at 6 px; weak blue the black one at 6 px only.
    assert [s["path"] for s in info["similar_images"]] == ["img4.png", "img2.png"]
    assert r["icons"]["similar_static"]["flips"] == [1, 0] and r["icons"]["similar_dynamic"]["flips"] == [2, 1]
    assert [p["cell"] for p in r["random_cells"]["patches"]] == [[0, 1], [1, 1]]
    for kind in ("random_cells", "noise"):
        assert sum(r[kind]["dynamic"]["flips"]) == 0 and sum(r[kind]["universal"]["flips"]) == 0
    figure = Image.open(attack_run / "features/pair-tench-goldfish/attack/attack-2.png")
    assert figure.size[0] > 3 * 160


def test_attack_a_class_without_images(attack_run, capsys):
    assert _attack(attack_run, "--pair", "hammerhead", "goldfish", *ARGS, "--similar", 1) == 0
    assert "no image is classified as 'hammerhead'" in capsys.readouterr().out
    info = json.loads((attack_run / "features/pair-hammerhead-goldfish/attack/attack-2.json").read_text())
    r = info["results"]["icons"]
    assert info["attacked_images"] == [] and r["static"]["rate"] is None and r["dynamic"]["images"] == 0
    # hammerhead's logit is 0 everywhere, so its probability is largest where the others are
    # smallest: on the black image
    assert [s["path"] for s in info["similar_images"]] == ["img4.png"]
    assert r["universal"]["flips"] == [1, 0]


def test_attack_target_alone_and_from(attack_run, capsys):
    assert _attack(attack_run, "--target", "goldfish", *ARGS) == 0
    info = json.loads((attack_run / "features/class-goldfish/attack/attack-2.json").read_text())
    assert info["attacked_images"] == [] and info["results"]["icons"]["static"]["rate"] is None
    assert info["results"]["icons"]["universal"]["flips"] == [1, 0]
    assert _attack(attack_run, "--target", "goldfish", "--from", "tench", *ARGS) == 0
    info = json.loads((attack_run / "features/class-goldfish/attack/attack-2-from-tench.json").read_text())
    assert info["results"]["icons"]["dynamic"]["flips"] == [2, 1]


def test_a_pair_attacked_both_ways_keeps_both_results_and_similar_images_suffice(attack_run, capsys):
    assert _attack(attack_run, "--pair", "goldfish", "tench", *ARGS) == 0
    folder = attack_run / "features/pair-tench-goldfish/attack"
    assert (folder / "attack-2-from-goldfish.json").is_file() and (folder / "attack-2-from-goldfish.png").is_file()
    # no image of hammerhead and no universal sample: the images most like it are still attacked
    assert _attack(attack_run, "--pair", "hammerhead", "goldfish", "--universal", "0", "--similar", "2") == 0
    assert "0 image(s) classified hammerhead and 2 most like it" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (("--pair", "tench", "goldfsh"), "unknown class 'goldfsh'; did you mean 'goldfish'"),
    (("--pair", "tench", "tiger shark"), "no two-class view of 'tench' vs 'tiger shark'; add it to layout.pairs"),
    (("--pair", "hammerhead", "goldfish", "--universal", "0", "--similar", "0"),
     "no image .* is classified as 'hammerhead', --similar is 0 and --universal is 0, so there is nothing to attack"),
    (("--target", "goldfish", "--universal", "0"), "--target alone measures the universal patch"),
    (("--target", "tench"), "no class atlas of 'tench'"),
    (("--pair", "tench", "goldfish", "--from", "tench"), "--from goes with --target"),
    (("--target", "goldfish", "--from", "Goldfish"), "'goldfish' is both A and B"),
    (("--pair", "tench", "goldfish", "--size", "1.5"), "fractions of the image side"),
    (("--pair", "tench", "goldfish", "--grid", "3"), "no 3x3 grid"),
    (("--pair", "tench", "goldfish", "--layer", "feature"), "unknown layer 'feature'"),
])
def test_errors_are_one_line(attack_run, capsys, argv, message):
    assert _attack(attack_run, *argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert re.search(message, err), err


def test_unreadable_image_and_missing_icons(attack_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(attack_run, run)
    from atlas.config import load_config

    save_config(load_config(run, [f"run_dir={run}", f"images={run / 'images'}"]))
    (run / "images" / "img1.png").write_bytes(b"not a png")
    assert _attack(run, "--pair", "tench", "goldfish", *ARGS) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "img1.png (not an image)" in err and err.count("\n") == 1
    shutil.rmtree(run / "features/pair-tench-goldfish/icons-2")
    assert _attack(run, "--pair", "tench", "goldfish", *ARGS) == 2
    err = capsys.readouterr().err
    assert "has no rendered icons" in err and f"run `atlas render {run}`" in err
    assert _attack(run, "--pair", "tench", "goldfish", "--grid", "2") == 2
    assert "icons of features/pair-tench-goldfish are not rendered" in capsys.readouterr().err
