"""Token and channels-last layers as (C, H, W) maps: reading them, attribution through them,
receptive fields, and `atlas run` end to end on a tiny ViT and a tiny Swin."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from atlas.errors import AtlasError
from atlas.layer_maps import LayerMap, choose_map, from_map, model_token_hints, to_map
from atlas.layers import LayerTap, map_shapes
from atlas.models import fixed_input_size
from atlas.receptive import box_for, receptive_field

TESTS = Path(__file__).parent


def test_auto_layout_from_the_shape():
    assert choose_map("l", (96, 56, 56)).layout == "nchw"
    assert choose_map("l", (56, 56, 96)).layout == "nhwc"
    assert choose_map("l", (7, 7, 7)).layout == "nchw"  # ambiguous: channels first, as convolutions give
    tokens = choose_map("l", (197, 768))
    assert (tokens.layout, tokens.prefix, tokens.grid, tokens.source) == ("tokens", 1, (14, 14), "guessed")
    assert choose_map("l", (201, 64)).prefix == 5  # 4 register tokens + a class token before a 14x14 grid
    declared = choose_map("l", (65, 16), hints=(1, (8, 8)))
    assert (declared.prefix, declared.grid, declared.source) == (1, (8, 8), "model")
    assert declared.map_shape((65, 16)) == (16, 8, 8)
    assert LayerMap("nhwc").map_shape((56, 56, 96)) == (96, 56, 56)


@pytest.mark.parametrize("shape, layout, prefix, message", [
    ((197, 768), "nchw", "auto", r"outputs shape \(197, 768\), which collect.layout = 'nchw' cannot read"),
    ((96, 56, 56), "tokens", "auto", r"outputs shape \(96, 56, 56\), which collect.layout = \"tokens\" cannot read"),
    ((96, 56, 56), "nhwc", "auto", r"output \(96, 56, 56\) as a 96x56 map of a square input; it is probably \"nchw\""),
    ((197, 768), "tokens", 2, r"197 tokens of width 768, and 197 minus 2 prefix tokens is no square"),
    ((1000,), "auto", "auto", r"outputs shape \(1000,\), a vector with no positions"),
    ((2, 3, 4, 5), "auto", "auto", r"outputs shape \(2, 3, 4, 5\), which is not a"),
])
def test_a_wrong_layout_is_one_line_naming_the_shape(shape, layout, prefix, message):
    with pytest.raises(AtlasError, match=message) as info:
        choose_map("l", shape, layout=layout, prefix=prefix)
    assert "\n" not in str(info.value)


def test_maps_and_back_are_inverse():
    x = torch.randn(2, 65, 16)
    m = to_map(x, "tokens", 1, (8, 8))
    assert m.shape == (2, 16, 8, 8)
    torch.testing.assert_close(m[:, :, 2, 3], x[:, 1 + 2 * 8 + 3])  # row-major patch order
    torch.testing.assert_close(from_map(m, x[:, :1], "tokens"), x, rtol=0, atol=0)
    y = torch.randn(2, 6, 6, 5)
    torch.testing.assert_close(from_map(to_map(y, "nhwc", 0, None), None, "nhwc"), y, rtol=0, atol=0)


def test_model_declarations_of_tokens_and_input_size():
    vit, swin = tiny.vit(), tiny.swin()
    assert model_token_hints(vit) == (1, (8, 8))
    assert fixed_input_size(vit) == tiny.VIT_SIZE
    assert fixed_input_size(swin) is None and model_token_hints(swin) == (None, None)


def _reverse_mode_attribution(model, layer, layer_map, x, yx, n_classes):
    """h_p . dlogit_c/dh_p by one reverse-mode gradient per class, through a hook that swaps the
    layer's output for a leaf built from its map."""
    captured = {}
    hook = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    try:
        model(x)
    finally:
        hook.remove()
    out = captured["out"].detach()
    h = to_map(out, layer_map.layout, layer_map.prefix, layer_map.grid).detach().clone().requires_grad_(True)
    prefix = out[:, :layer_map.prefix] if layer_map.layout == "tokens" and layer_map.prefix else None
    swap = dict(model.named_modules())[layer].register_forward_hook(
        lambda m, i, o: from_map(h, prefix, layer_map.layout))
    try:
        logits = model(x)
    finally:
        swap.remove()
    expected = torch.zeros(*yx.shape[:2], n_classes)
    for c in range(n_classes):
        (grad,) = torch.autograd.grad(logits[:, c].sum(), h, retain_graph=True)
        for b in range(yx.shape[0]):
            for j in range(yx.shape[1]):
                y, x_ = yx[b, j]
                expected[b, j, c] = (grad[b, :, y, x_] * h[b, :, y, x_]).sum()
    return expected, h.detach()


@pytest.mark.parametrize("factory, layer, layout", [
    (tiny.vit, "encoder.layers.encoder_layer_0", "tokens"),
    (tiny.swin, "features.1", "nhwc"),
    (tiny.swin, "permute", "nchw"),
])
def test_attribution_on_maps_equals_a_reverse_mode_reference(factory, layer, layout):
    model = factory()
    maps, shapes = map_shapes(model, (3, tiny.VIT_SIZE, tiny.VIT_SIZE), [layer])
    assert maps[layer].layout == layout
    tap = LayerTap(model, [layer], maps=maps)
    x = torch.rand(3, 3, tiny.VIT_SIZE, tiny.VIT_SIZE)
    out = tap.run(x, logits=True)
    torch.testing.assert_close(out.logits, model(x), rtol=0, atol=1e-5)  # the cut changes nothing
    assert tuple(out.acts[layer].shape[1:]) == shapes[layer]
    yx = torch.tensor([[[2, 3], [4, 4]], [[1, 1], [5, 6]], [[7, 7], [0, 0]]])
    attr = tap.attribute(layer, out, yx, chunk=2)
    expected, h = _reverse_mode_attribution(model, layer, maps[layer], x, yx, 1000)
    torch.testing.assert_close(out.acts[layer], h, rtol=0, atol=1e-6)
    # not trivially zero (at a ViT's last-but-one block it would be: the last block reads the
    # token only through LayerNorm, which no scaling of the token changes)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(attr, expected, rtol=1e-4, atol=1e-5)


def test_receptive_field_of_attention_is_the_whole_image_and_of_patches_the_patch():
    vit = tiny.vit()
    maps, _ = map_shapes(vit, (3, 32, 32), ["encoder.layers.encoder_layer_0", "conv_proj"])
    whole = receptive_field(vit, "encoder.layers.encoder_layer_0", 32, maps["encoder.layers.encoder_layer_0"])
    assert whole.whole and (whole.stride_y, whole.stride_x) == (4, 4)
    assert box_for(whole, np.array([[0, 0], [5, 2]]), 32).tolist() == [[0, 0, 32, 32]] * 2
    patch = receptive_field(vit, "conv_proj", 32)
    assert not patch.whole and (patch.stride_y, patch.size_y, patch.offset_y) == (4, 4, 0)
    swin = tiny.swin()
    maps, _ = map_shapes(swin, (3, 32, 32), ["features.1"])
    local = receptive_field(swin, "features.1", 32, maps["features.1"])
    # a 4x4-token window of 2 px tokens: every position sees its window, which differs by position,
    # so the field is the window's size centred on the token
    assert local.centred and not local.whole and (local.stride_y, local.size_y, local.offset_y) == (2, 8, -3)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    return subprocess.run([sys.executable, "-m", "atlas", *args], capture_output=True, text=True, cwd=cwd, env=env)


def _config(tmp_path: Path, name: str, model: str, layers: list[str], **collect) -> Path:
    table = {"samples_per_image": 6, "batch_size": 4, "workers": 0, "dtype": "float32", **collect}
    lines = [f'run_dir = "{tmp_path / name}"', f'images = "{tmp_path / "images"}"', f'model = "{model}"',
             f"layers = {json.dumps(layers)}", 'weights = "none"',
             "[preprocess]", f"size = {tiny.VIT_SIZE}", f"resize = {tiny.VIT_SIZE}", "mean = [0.5, 0.5, 0.5]",
             "std = [0.25, 0.25, 0.25]", "[collect]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    lines += ["[layout]", "n_neighbors = 5", "trust_samples = 0", "[grid]", "sizes = [3]", "min_count = 1",
              "[render]", "icon_size = 16", "steps = 3", "batch_size = 8", "pad = 1", "jitter = 1", "[mosaic]",
              "labels = false"]
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _write_photos(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / ("n01440764", "n01443537")[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")


def test_atlas_run_on_a_tiny_vit_and_swin_and_compare_with_a_cnn(tmp_path):
    _write_photos(tmp_path / "images", 10)
    vit_config = _config(tmp_path, "vit", "tiny:vit", ["encoder.layers.encoder_layer_1"])
    vit = run_cli("run", str(vit_config), cwd=tmp_path)
    assert vit.returncode == 0, vit.stderr
    assert "optimised at 32 px and cut to the 16 px square around the centre position" in vit.stdout
    run = tmp_path / "vit"
    with Image.open(run / "encoder.layers.encoder_layer_1" / "atlas-3.png") as image:
        assert image.size == (48, 48)
    icons = json.loads((run / "encoder.layers.encoder_layer_1" / "icons-3" / "icons.json").read_text())
    assert icons["input_size"] == 32 and icons["icon_size"] == 16
    with Image.open(run / "encoder.layers.encoder_layer_1" / "icons-3" / icons["icons"][0]["file"]) as icon:
        assert icon.size == (16, 16)

    inspected = run_cli("inspect", str(run), "--layer", "encoder.layers.encoder_layer_1", "--grid", "3",
                        "--class", "tench", cwd=tmp_path)
    assert inspected.returncode == 0, inspected.stderr
    facts = json.loads(next((run / "encoder.layers.encoder_layer_1" / "inspect").glob("*.json")).read_text())
    assert facts["receptive_field"]["whole"]
    boxes = [m["box"] for m in facts["members"]]
    assert boxes and all(box == [0.0, 0.0, 32.0, 32.0] for box in boxes)  # attention sees the whole input

    swin_config = _config(tmp_path, "swin", "tiny:swin", ["features.1", "features.3"])
    swin = run_cli("run", str(swin_config), cwd=tmp_path)
    assert swin.returncode == 0, swin.stderr
    for layer in ("features.1", "features.3"):
        assert (tmp_path / "swin" / layer / "atlas-3.png").is_file()

    cnn_config = _config(tmp_path, "cnn", "tiny:make", ["deep"])
    for step in ("collect", "layout", "grid", "mosaic"):  # no icons: compare shows the preview
        done = run_cli(step, str(cnn_config), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    compared = run_cli("compare", str(tmp_path / "cnn"), str(run), str(tmp_path / "swin"), "--grid", "3",
                       "--out", str(tmp_path / "cmp.png"), cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr
    figures = json.loads((tmp_path / "cmp.json").read_text())
    assert len(figures["panels"]) == 4, figures.keys()

    wrong = run_cli("collect", str(vit_config), "--set", "collect.layout=nchw", cwd=tmp_path)
    assert wrong.returncode == 2
    assert "outputs shape (65, 16)" in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1


def test_classic_views_read_token_layers_and_dream_refuses_a_fixed_size_model(tmp_path):
    _write_photos(tmp_path / "images", 1)
    photo = next((tmp_path / "images").rglob("*.png"))
    common = ("--model", "tiny:vit", "--weights", "none", "--layer", "encoder.layers.encoder_layer_0")
    maps = run_cli("maps", str(photo), *common, "--channels", "4", "--out", str(tmp_path / "maps.png"), cwd=tmp_path)
    assert maps.returncode == 0, maps.stderr
    assert "4 of 16 feature maps" in maps.stdout and "(8x8)" in maps.stdout
    vis = run_cli("vis", "tiny:vit", "--weights", "none", "--layer", "encoder.layers.encoder_layer_0", "--channel",
                  "3", "--steps", "2", "--out", str(tmp_path / "vis.png"), cwd=tmp_path)
    assert vis.returncode == 0, vis.stderr
    with Image.open(tmp_path / "vis.png") as image:
        assert image.size == (tiny.VIT_SIZE, tiny.VIT_SIZE)  # the only size the ViT takes
    dream = run_cli("dream", str(photo), *common, cwd=tmp_path)
    assert dream.returncode == 2 and "takes 32 px square inputs only" in dream.stderr
    assert len(dream.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("made, now", [({"prefix_tokens": 1}, {}), ({}, {"prefix_tokens": 1}),
                                       ({"layout": "tokens"}, {"layout": {"blocks.1": "nhwc"}})])
def test_a_changed_layout_setting_makes_activations_stale_both_ways(tmp_path, made, now):
    from atlas.config import CollectConfig
    from atlas.store import Run
    from toy_runs import toy_config, write_activations

    old = toy_config(tmp_path, collect=CollectConfig(**made))
    write_activations(tmp_path, {"blocks.1": np.ones((10, 4), np.float32)}, config=old)
    with pytest.raises(AtlasError, match=r"is out of date \(collected with collect\.(prefix_tokens|layout) = "):
        Run(tmp_path, toy_config(tmp_path, collect=CollectConfig(**now))).activations_fingerprint()
    Run(tmp_path, toy_config(tmp_path, collect=CollectConfig(**made))).activations_fingerprint()  # same: current


def test_layout_tables_at_auto_are_the_default_config():
    from atlas.config import CollectConfig

    assert CollectConfig(layout={}).layout == "auto"
    assert CollectConfig(layout={"a": "auto", "b": "nhwc"}).layout == {"b": "nhwc"}


def test_icons_larger_than_a_fixed_size_model_are_refused_and_a_declared_prefix_falls_back_to_none():
    from atlas.render import render_icons

    with pytest.raises(AtlasError, match="icon_size = 64 is larger than the 32 px inputs the model takes"):
        render_icons(tiny.vit(), "encoder.layers.encoder_layer_0", np.ones((1, 16), np.float32), icon_size=64)
    patches = choose_map("patch_embed", (196, 32), hints=(1, (14, 14)))  # timm: before the class token joins
    assert (patches.prefix, patches.grid) == (0, (14, 14))


def test_collect_activations_in_memory_on_an_unfrozen_vit():
    from atlas.collect import collect_activations

    vit = tiny.vit()  # parameters still require grad, as a user's fresh module does
    samples = collect_activations(vit, torch.rand(2, 3, 32, 32), ["encoder.layers.encoder_layer_0"],
                                  samples_per_image=3)
    acts = samples.acts["encoder.layers.encoder_layer_0"]
    assert acts.shape == (6, 16) and samples.attr["encoder.layers.encoder_layer_0"].shape == (6, 1000)
