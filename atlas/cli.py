"""The `atlas` command line: parses arguments and calls the stages' `run` and the readers.

Exit codes: 0 ok, 2 bad input or config (one line on stderr, no traceback), 1 internal error,
130 interrupted (an interrupted collect or render resumes when run again).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from collections.abc import Sequence

from .errors import AtlasError

MODEL_HELP = "efficientnet_lite0, a torchvision classifier name, or package.module:factory"


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"atlas: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="atlas", description="Activation atlases of PyTorch vision models.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("layers", help="list a model's layer names with their output shapes")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--weights", default="none",
                   help="weights to load (shapes do not depend on them; default: none, so nothing is downloaded)")
    p.set_defaults(handler=cmd_layers)

    from .store.run import ACTIVATIONS, GRID, LAYOUT

    for stage, text in (("collect", f"images -> RUN/{ACTIVATIONS}"), ("layout", f"activations -> RUN/{LAYOUT}"),
                        ("grid", f"layout -> RUN/{GRID}"),
                        ("render", "grid -> an icon per cell in RUN/<layer>/icons-<N>/"),
                        ("mosaic", "icons -> RUN/<layer>/atlas-<N>.png (and a preview from image patches)"),
                        ("view", "grids and icons -> RUN/viewer/index.html, the interactive atlas (opens from disk)"),
                        ("run", "every stage in order, skipping what is up to date")):
        p = sub.add_parser(stage, help=text)
        p.add_argument("config", metavar="CONFIG" if stage in ("collect", "run") else "RUN",
                       help="a TOML config file or a run directory")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set collect.samples_per_image=8 (repeatable)")
        p.add_argument("--force", action="store_true", help="redo the stage even if it is up to date")
        if stage in ("collect", "render"):
            p.add_argument("--shard", metavar="I/N", default=None,
                           help="do only share I (from 0) of N of the work, for N independent jobs such as a "
                                "job array (under torchrun the ranks share it without this)")
            p.add_argument("--merge", action="store_true",
                           help="compute nothing: write the stage's result from the parts every --shard job left")
        if stage == "view":
            p.add_argument("--serve", action="store_true", help="then serve the viewer on localhost")
            p.add_argument("--port", type=_port, default=8000, help="port for --serve (default: 8000; 0 = any free one)")
        p.set_defaults(handler=cmd_stage)

    _add_reading_parsers(sub)
    _add_view_parsers(sub)
    return parser


def _add_reading_parsers(sub) -> None:
    """inspect, patches and compare: reading a run's atlas."""
    p = sub.add_parser("inspect", help="one atlas cell: its classes, labels, icon and member patches")
    p.add_argument("run", metavar="RUN", help="a run directory")
    p.add_argument("--layer", required=True, help="layer of the run, or a focus map such as L/class-NAME")
    p.add_argument("--grid", type=int, required=True, metavar="N", help="grid size N (of grid.sizes)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--cell", type=int, nargs=2, metavar=("I", "J"), help="column I (x) and row J (y) of the cell")
    what.add_argument("--class", dest="class_name", metavar="NAME",
                      help="list the cells most attributed to this class and inspect the first")
    p.set_defaults(handler=cmd_inspect)

    p = sub.add_parser("patches", help="the dataset patches that activate one channel most")
    p.add_argument("run", metavar="RUN", help="a run directory")
    p.add_argument("--layer", required=True, help="layer of the run")
    p.add_argument("--channel", type=int, required=True, metavar="K", help="channel index")
    p.set_defaults(handler=cmd_patches)

    from .compare import FOLLOW, NEIGHBORS

    p = sub.add_parser("compare", help="atlases of several layers (or runs over the same images) side by side, "
                                       "with figures to compare")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories; several runs must share images")
    p.add_argument("--layers", nargs="+", metavar="L", default=None,
                   help="compare only these layers, in this order (default: every layer of each run's config)")
    p.add_argument("--grid", type=int, metavar="N", default=None,
                   help="grid size (default: the largest with icons for every layer, else with icons or a preview)")
    p.add_argument("--neighbors", type=int, metavar="K", default=NEIGHBORS,
                   help=f"nearest images compared between panels (default {NEIGHBORS})")
    p.add_argument("--out", metavar="PATH", default=None,
                   help="the PNG to write (default RUN1/compare-N.png); the JSON goes beside it")
    p.add_argument("--follow", type=int, metavar="K", default=FOLLOW,
                   help=f"mark K images on every panel, numbered, where their samples lie on average, to follow "
                        f"them from layer to layer (default {FOLLOW}; 0 = none)")
    p.set_defaults(handler=cmd_compare)

    p = sub.add_parser("place", help="where new images' samples fall on each map of a run, and the cells' top classes")
    p.add_argument("run", metavar="RUN", help="a run directory")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--device", default=None, help="auto, cpu or cuda (default: the run's collect.device)")
    p.set_defaults(handler=cmd_place)

    from . import attack

    p = sub.add_parser("attack", help="atlas-guided patches that turn class A into B, against controls")
    p.add_argument("run", metavar="RUN", help="a run directory")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--pair", nargs=2, metavar=("A", "B"),
                      help="patches from the two-class view of A vs B, pasted onto the images classified as A")
    what.add_argument("--target", metavar="B", help="patches from B's class atlas (the universal figures only, "
                                                    "unless --from A)")
    p.add_argument("--from", dest="source", metavar="A", help="with --target: the class whose images are attacked")
    p.add_argument("--layer", default=None, help="the layer whose map to use, when several layers have one")
    p.add_argument("--grid", type=int, metavar="N", default=None,
                   help="grid size (default: the largest with rendered icons)")
    p.add_argument("--patches", type=int, default=attack.N_PATCHES, metavar="K",
                   help=f"patches of each kind: the K cells most attributed to B (default {attack.N_PATCHES})")
    p.add_argument("--size", type=float, default=attack.STATIC_SIZE, metavar="F",
                   help=f"side of the static patch, fraction of the image side (default {attack.STATIC_SIZE})")
    p.add_argument("--corner", choices=attack.CORNERS, default=attack.STATIC_CORNER,
                   help=f"corner of the static patch (default {attack.STATIC_CORNER})")
    p.add_argument("--sizes", type=float, nargs="+", default=list(attack.DYNAMIC_SIZES), metavar="F",
                   help="sides tried at every corner for the dynamic placement (default "
                        f"{' '.join(map(str, attack.DYNAMIC_SIZES))})")
    p.add_argument("--universal", type=int, default=attack.UNIVERSAL_IMAGES, metavar="N",
                   help=f"corpus images for the universal figures (default {attack.UNIVERSAL_IMAGES}; 0 = none)")
    p.add_argument("--similar", type=int, default=attack.N_SIMILAR, metavar="K",
                   help="also attack the K corpus images most like A (largest P(A), classified neither A nor B; "
                        f"default {attack.N_SIMILAR})")
    p.add_argument("--seed", type=int, default=0, help="seeds the random cells, the noise and the sample (default 0)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.set_defaults(handler=cmd_attack)


def _add_view_parsers(sub) -> None:
    """vis, dream, maps and filters: the classic single-unit views (no run needed)."""
    from .models.zoo import OFFLINE_DEFAULT

    def common(p: argparse.ArgumentParser, model_option: bool) -> None:
        if model_option:
            p.add_argument("--model", default=OFFLINE_DEFAULT, help=f"{MODEL_HELP} (default: {OFFLINE_DEFAULT})")
        p.add_argument("--weights", default="DEFAULT",
                       help="DEFAULT (pretrained), none (random init) or a state-dict file (default: DEFAULT)")
        p.add_argument("--out", default=None, help="the PNG to write (default: a name in the current folder)")

    p = sub.add_parser("vis", help="feature visualisation of a channel (--layer, --channel) or a class (--class)")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--layer", help="dotted layer name (`atlas layers MODEL` lists them)")
    p.add_argument("--channel", type=int, help="channel of --layer whose mean over positions is maximised")
    p.add_argument("--class", dest="class_", metavar="NAME", help="class name or wnid whose logit is maximised")
    p.add_argument("--size", type=int, default=128, help="image side, pixels (default: 128)")
    p.add_argument("--steps", type=int, default=256, help="optimisation steps (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    common(p, model_option=False)
    p.set_defaults(handler=cmd_vis)

    p = sub.add_parser("dream", help="DeepDream a photo at a layer (multi-octave gradient ascent)")
    p.add_argument("image", help="the photo")
    p.add_argument("--layer", required=True, help="dotted layer name whose activations' L2 norm is maximised")
    p.add_argument("--channel", type=int, help="maximise this channel's mean instead")
    p.add_argument("--octaves", type=int, default=3, help="pyramid levels (default: 3)")
    p.add_argument("--octave-scale", type=float, default=1.4, help="side ratio between levels (default: 1.4)")
    p.add_argument("--steps", type=int, default=10, help="gradient steps per level (default: 10)")
    p.add_argument("--lr", type=float, default=0.02, help="step size, [0, 1] pixel units (default: 0.02)")
    p.add_argument("--size", type=int, default=384, help="the photo's longer side is resized to this (default: 384)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random jitter (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    common(p, model_option=True)
    p.set_defaults(handler=cmd_dream)

    p = sub.add_parser("maps", help="one image's feature maps at a layer as a labelled grid")
    p.add_argument("image", help="the photo (preprocessed as for the model)")
    p.add_argument("--layer", required=True, help="dotted layer name")
    p.add_argument("--channels", type=int, default=64, help="how many channels to show (default: 64)")
    p.add_argument("--sort", choices=("mean", "index"), default="mean",
                   help="mean: the channels with the largest mean activation; index: the first ones (default: mean)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    common(p, model_option=True)
    p.set_defaults(handler=cmd_maps)

    p = sub.add_parser("filters", help="the first RGB convolution's filters as colour tiles")
    p.add_argument("model", help=MODEL_HELP)
    common(p, model_option=False)
    p.set_defaults(handler=cmd_filters)


def _port(text: str) -> int:
    """A TCP port number for --port (0 = any free one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0-65535)")
    return value


def _version() -> str:
    from . import __version__

    return f"atlas {__version__}"


def cmd_layers(args: argparse.Namespace) -> None:
    from .layer_maps import choose_map, model_token_hints
    from .layers import layer_shapes
    from .models import fixed_input_size, load_model

    model = load_model(args.model, args.weights)
    shapes = layer_shapes(model.module, model.input_shape)
    modules = dict(model.module.named_modules())
    hints = model_token_hints(model.module)
    width = max((len(name) for name in modules if name), default=10)
    fixed = fixed_input_size(model.module)
    print(f"{args.model}: input {tuple(model.input_shape)}{' (the only size it takes)' if fixed else ''}; "
          f"{len(modules) - 1} layers; map: how collect reads each output as (C, H, W) (collect.layout overrides)")
    for name, module in modules.items():
        if not name:
            continue
        shape = shapes.get(name)
        shown = str(tuple(shape)) if shape is not None else "(not called by forward)"
        try:
            layer_map = choose_map(name, shape, hints=hints)
            as_map = f"{layer_map.describe()} -> {layer_map.map_shape(shape)}"
        except AtlasError:
            as_map = "-"
        print(f"{name:<{width}}  {shown:<18}  {type(module).__name__:<24}  {as_map}")


def cmd_stage(args: argparse.Namespace) -> None:
    from .config import load_config
    from .distributed import join_from_environment, leave, parse_shard
    from .pipeline import STAGES, run_stages

    config = load_config(args.config, args.overrides)
    shard_text, merge = getattr(args, "shard", None), getattr(args, "merge", False)
    if merge and (shard_text or args.force):
        raise AtlasError(f"--merge takes neither --shard nor --force: run `atlas {args.command} "
                         f"{config.run_dir} --merge` once every shard has finished")
    shard = join_from_environment()
    try:
        if shard_text:
            if shard.group:
                raise AtlasError("--shard is for jobs started one by one; under torchrun the ranks share the work "
                                 "without it")
            shard = parse_shard(shard_text)
        if shard.group and merge:
            raise AtlasError("--merge is for jobs started one by one; under torchrun rank 0 writes the result")
        log = print if shard.leads else (lambda line: print(f"[rank {shard.index}] {line}"))
        run_stages(config, STAGES if args.command == "run" else (args.command,), force=args.force, log=log,
                   shard=shard, merge=merge)
    except AtlasError as exc:
        # The stages a refusal names must run with this command's overrides, which RUN/config.toml
        # does not hold yet (it is written after a stage succeeds).
        if args.overrides and "; run `atlas " in str(exc):
            sets = " ".join(f"--set {shlex.quote(o)}" for o in args.overrides)
            raise AtlasError(f"{exc} (each with {sets})") from None
        raise
    finally:
        leave()
    if getattr(args, "serve", False) and shard.index == 0:
        from .view import serve

        serve(config.run_dir, args.port)


def cmd_inspect(args: argparse.Namespace) -> None:
    from .inspect import inspect

    inspect(args.run, args.layer, args.grid, cell=tuple(args.cell) if args.cell else None,
            by_class=args.class_name)


def cmd_patches(args: argparse.Namespace) -> None:
    from .inspect import channel_patches

    channel_patches(args.run, args.layer, args.channel)


def cmd_compare(args: argparse.Namespace) -> None:
    from .compare import compare_runs

    compare_runs(args.runs, args.layers, args.grid, args.neighbors, args.out, follow=args.follow)


def cmd_place(args: argparse.Namespace) -> None:
    from .place import place_images

    place_images(args.run, args.images, device=args.device)


def cmd_attack(args: argparse.Namespace) -> None:
    from .attack import patch_attack

    patch_attack(args.run, pair=args.pair, target=args.target, source=args.source, layer=args.layer, size=args.grid,
                 n_patches=args.patches, static_size=args.size, corner=args.corner, sizes=args.sizes,
                 universal_images=args.universal, n_similar=args.similar, seed=args.seed, batch_size=args.batch_size)


def cmd_vis(args: argparse.Namespace) -> None:
    from .views import vis

    vis(args.model, layer=args.layer, channel=args.channel, class_=args.class_, size=args.size, steps=args.steps,
        seed=args.seed, device=args.device, weights=args.weights, out=args.out)


def cmd_dream(args: argparse.Namespace) -> None:
    from .views import dream

    dream(args.image, layer=args.layer, channel=args.channel, model=args.model, octaves=args.octaves,
          octave_scale=args.octave_scale, steps=args.steps, lr=args.lr, size=args.size, seed=args.seed,
          device=args.device, weights=args.weights, out=args.out)


def cmd_maps(args: argparse.Namespace) -> None:
    from .views import maps

    maps(args.image, layer=args.layer, channels=args.channels, sort=args.sort, model=args.model, device=args.device,
         weights=args.weights, out=args.out)


def cmd_filters(args: argparse.Namespace) -> None:
    from .views import filters

    filters(args.model, weights=args.weights, out=args.out)


def main(argv: Sequence[str] | None = None) -> int:
    # torch.func's forward-mode AD (the fallback attribution route) imports torch.jit internally,
    # which warns about its own deprecation; nothing of ours uses torch.jit.
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except AtlasError as exc:
        print(f"atlas: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("atlas: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
