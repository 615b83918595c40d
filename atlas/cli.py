"""The `atlas` command line: parses arguments and calls each stage's `run`.

Exit codes: 0 ok, 2 bad input or config (one line on stderr, no traceback), 1 internal error,
130 interrupted (an interrupted collect resumes when run again).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from .errors import AtlasError

STAGES = ("collect", "layout", "grid", "render", "mosaic")


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"atlas: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="atlas", description="Activation atlases of PyTorch vision models.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("layers", help="list a model's layer names with their output shapes")
    p.add_argument("model", help="efficientnet_lite0, a torchvision classifier name, or package.module:factory")
    p.add_argument("--weights", default="none",
                   help="weights to load (shapes do not depend on them; default: none, so nothing is downloaded)")

    for stage, text in (("collect", "images -> RUN/activations.h5"), ("layout", "activations -> RUN/layout.h5"),
                        ("grid", "layout -> RUN/grid.h5"),
                        ("render", "grid -> an icon per cell in RUN/<layer>/icons-<N>/"),
                        ("mosaic", "icons -> RUN/<layer>/atlas-<N>.png (and a preview from image patches)"),
                        ("run", "every stage in order, skipping what is up to date")):
        p = sub.add_parser(stage, help=text)
        p.add_argument("config", metavar="CONFIG" if stage in ("collect", "run") else "RUN",
                       help="a TOML config file or a run directory")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set collect.samples_per_image=8 (repeatable)")
        p.add_argument("--force", action="store_true", help="redo the stage even if it is up to date")

    from .compare import add_compare_parser
    from .inspect import add_inspect_parsers
    from .views import add_view_parsers

    add_inspect_parsers(sub)  # inspect, patches: reading an atlas
    add_compare_parser(sub)  # compare: layers (or runs) side by side
    add_view_parsers(sub)  # vis, dream, maps, filters: the classic single-unit views
    return parser


def _version() -> str:
    from . import __version__

    return f"atlas {__version__}"


def cmd_layers(args: argparse.Namespace) -> None:
    from .layers import layer_shapes
    from .models import load_model

    model = load_model(args.model, args.weights)
    shapes = layer_shapes(model.module, model.input_shape)
    modules = dict(model.module.named_modules())
    width = max((len(name) for name in modules if name), default=10)
    print(f"{args.model}: input {tuple(model.input_shape)}; {len(modules) - 1} layers")
    for name, module in modules.items():
        if not name:
            continue
        shape = shapes.get(name)
        shown = str(tuple(shape)) if shape is not None else "(not called by forward)"
        print(f"{name:<{width}}  {shown:<18}  {type(module).__name__}")


def cmd_stage(args: argparse.Namespace) -> None:
    import importlib

    from .config import load_config, save_config

    config = load_config(args.config, args.overrides)
    stages = STAGES if args.command == "run" else (args.command,)
    for stage in stages:
        importlib.import_module(f"atlas.{stage}").run(config, force=args.force)
        # The run directory holds the effective config of its last successful stage (not of a
        # command that failed on, say, a misspelt layer).
        save_config(config)


def main(argv: Sequence[str] | None = None) -> int:
    # torch.func's forward-mode AD (the fallback attribution route) imports torch.jit internally,
    # which warns about its own deprecation; nothing of ours uses torch.jit.
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "view"):
            args.view(args)
        elif args.command == "layers":
            cmd_layers(args)
        else:
            cmd_stage(args)
    except AtlasError as exc:
        print(f"atlas: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("atlas: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
