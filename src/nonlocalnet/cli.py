"""Command line: ``nonlocalnet <command>`` (also ``python -m nonlocalnet``).

Each handler parses nothing itself and calls one library function. Every error, a bad argument
or one the work ran into, is one line on stderr (``nonlocalnet <command>: error: <message>``,
naming the input or the path) and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import torch

from . import __version__
from .attention import IMPLS, MODES
from .bench import SHAPES


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    _output_file(args.json, "json")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = bench.parse_shape(args.shape)
    env = bench.environment(device)
    roof = bench.matmul_rates(device, dtype)
    print(f"nonlocalnet {__version__}: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    rates = ", ".join(f"{rate:.0f} GFLOP/s ({library})" for library, rate in roof.items() if rate)
    print(f"input {tuple(shape)} {args.dtype} on {device}; matmul roof (2048^2): {rates}")
    reports = bench.compare_block_impls(
        shape, args.modes, args.impls, repeats=args.repeats, device=device, dtype=dtype,
        backward=not args.forward_only, seed=args.seed,
    )
    print(_bench_table(reports, bench))
    if args.json:
        _write_json(args.json, {"env": env, "shape": shape, "roof_gflops": roof,
                                "reports": [_as_dict(r) for r in reports]})
    return 0


def _output_file(path: str | None, flag: str) -> None:
    """An output file the command will write (``None``: not asked for) is not a folder; checked
    before the work, not after it."""
    if path is not None and os.path.isdir(path):
        raise ValueError(f"{flag}: expected a file to write, got the folder {path!r}")


def _json_text(data) -> str:
    from ._json import dumps  # strict JSON: NaN written as null

    return dumps(data, indent=1)


def _write_json(path: str, data) -> None:
    try:
        with open(path, "w") as f:
            f.write(_json_text(data) + "\n")
    except OSError as err:  # ENOSPC while writing names no file
        err.filename = err.filename or path
        raise


def _bench_table(reports, bench) -> str:
    head = (f"{'mode':<18} {'impl':<8} {'fwd':>9} {'GFLOP/s':>8} {'fwd mem':>9} {'fwd+bwd':>9} {'GFLOP/s':>8} "
            f"{'train mem':>10} {'err out':>8} {'err grad':>8}")
    lines = [head, "-" * len(head)]
    for report in reports:
        for r in report.results:
            rates = [r.rate(False), r.rate(True)]
            rates = ["n/a" if v is None else f"{v:.0f}" for v in rates]
            lines.append(
                f"{report.mode:<18} {r.name:<8} {bench.format_seconds(r.forward_s):>9} {rates[0]:>8} "
                f"{bench.format_bytes(r.forward_bytes):>9} {bench.format_seconds(r.train_s):>9} {rates[1]:>8} "
                f"{bench.format_bytes(r.train_bytes):>10} {r.output_error:>8.1e} {r.grad_error:>8.1e}"
            )
    lines.append("err: max relative error of the output and the input gradient against the naive form in float64")
    return "\n".join(lines)


def _as_dict(report) -> dict:
    return {"mode": report.mode, "results": [vars(r) for r in report.results]}


def _info(args: argparse.Namespace) -> int:
    from .flops import model_report
    from .models import create_model, model_card
    from .models.zoo import card_name

    card = model_card(args.model)
    overrides = {"inflation": args.inflation} if args.inflation else {}
    frames = args.frames or card.frames
    shape = (1, 3, frames, args.size, args.size)
    print(f"{card.name}: R{card.depth} {card.arch.upper()}, {card.nonlocal_count} non-local blocks, input {card.input} "
          f"({card.frames} frames at stride {card.rate}){', frozen BN' if card.frozen_bn else ''}"
          + (f", inflation {args.inflation}" if args.inflation else ""))
    for label, result in (("paper", card.paper), ("official", card.official)):
        if result:
            print(f"  {label}: Kinetics-400 top-1 {result[0]}, top-5 {result[1]} ({result[2]})")
    with torch.device("meta"):
        rows = model_report(create_model(card.name, num_classes=args.num_classes, **overrides), shape)
    print(f"view {tuple(shape[1:])}; FLOPs = 2 x multiply-adds (the paper's 'FLOPs' are GMACs)")
    print(_cost_table(rows))
    base_name = card_name("c2d", 0, card.depth, card.input)
    if base_name != card.name or args.inflation:
        with torch.device("meta"):
            base = model_report(create_model(base_name, num_classes=args.num_classes), shape)[-1]
        total = rows[-1]
        params, flops = total.weights / base.weights, total.flops / base.flops
        print(f"against {base_name} (as Table 2e): params {params:.1f}x ({params:.3f}), FLOPs {flops:.1f}x ({flops:.3f})")
    return 0


def _cost_table(rows) -> str:
    head = f"{'stage':<12} {'params':>12} {'weights':>12} {'GFLOPs':>9} {'GMACs':>8} {'share':>6}"
    total = rows[-1].flops or 1
    lines = [head, "-" * len(head)]
    for r in rows:
        if not (r.params or r.flops):
            continue  # activations, pools, dropout
        if r is rows[-1]:
            lines.append("-" * len(head))
        lines.append(f"{r.name:<12} {r.params:>12,} {r.weights:>12,} {r.flops / 1e9:>9.2f} {r.flops / 2e9:>8.2f} "
                     f"{100 * r.flops / total:>5.1f}%")
    lines.append("weights: conv and fc weights only, the official counter's 'params' (43.2M for R101 C2D)")
    return "\n".join(lines)


def _models(args: argparse.Namespace) -> int:
    from .models import list_models, model_card

    names = list_models(args.pattern)
    if not names:
        raise ValueError(f"pattern: expected a pattern matching zoo names (e.g. 'i3d_nl5_*'), got {args.pattern!r}")
    head = f"{'name':<22} {'input':>6} {'params':>8} {'GFLOPs':>8} {'paper top-1':>12} {'official top-1':>15}"
    print(head + "\n" + "-" * len(head))
    for name in names:
        c = model_card(name)
        paper = f"{c.paper[0]} ({c.paper[2][-2:]})" if c.paper else "-"
        print(f"{name:<22} {c.input:>6} {c.params / 1e6:>7.2f}M {c.gflops:>8.2f} {paper:>12} "
              f"{c.official[0] if c.official else '-':>15}")
    print("GFLOPs: one frames x 224 x 224 view, 2 x multiply-adds; top-1: Kinetics-400 val (%)")
    return 0


def _recipes(args: argparse.Namespace) -> int:
    from .recipes import list_recipes

    rows = list_recipes(args.table)
    if not rows:
        raise ValueError(f"table: expected a table of the paper (2a .. 2g, 3, 4, 5, 6) or a pattern such as '2*', "
                         f"got {args.table!r}")
    head = f"{'table':<6} {'row':<34} {'paper':<44} config"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        where = r.config + (f" ({r.note})" if r.note else "") if r.config else f"out of reach: {r.note}"
        print(f"{r.table:<6} {r.row:<34} {r.paper or '-':<44} {where}")
    print("train a row: nonlocalnet train CONFIG (Tables 5-6: nonlocalnet detect train CONFIG); each config's "
          "comments give its recipe, initial weights and launch")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from . import weights
    from .models import create_model, model_card

    model_card(args.model)  # an unknown name before any file is read
    _output_file(args.out, "out")
    peer = getattr(args, "peer", "caffe2")
    if args.command == "convert" and args.use_scale is not None and peer != "mmaction2":
        raise ValueError("use_scale: --use-scale / --no-use-scale is for --from mmaction2")
    options: dict = {}
    if args.command == "inflate":  # torchvision's weights expect ImageNet's per-channel mean and std
        options = {"pixel_mean": weights.IMAGENET_PIXELS[0], "pixel_std": weights.IMAGENET_PIXELS[1]}
        if args.inflation:  # e.g. Table 2e's I3D 3x3x3: kept with the weights, so the model is rebuilt so
            options["inflation"] = args.inflation
        model = create_model(args.model, num_classes=args.num_classes, **options)
        conversion = weights.inflate_torchvision(weights.read_weights(args.source)["state_dict"], model)
    elif peer == "caffe2":
        options = {"nonlocal_options": {"mode": args.mode}} if args.mode else {}
        model = create_model(args.model, num_classes=args.num_classes, **options)
        conversion = weights.convert_caffe2(weights.load_caffe2_blobs(args.source), model, skip_classifier=args.init)
    else:
        state, config = weights.read_peer_checkpoint(args.source, peer)
        if peer == "mmaction2":
            options = weights.mmaction2_options(state, config, mode=args.mode, scale=args.use_scale,
                                                model=args.model)
        else:
            options = weights.slowfast_options(state, config, mode=args.mode, model=args.model)
        model = create_model(args.model, num_classes=args.num_classes, **options)
        convert = weights.convert_mmaction2 if peer == "mmaction2" else weights.convert_slowfast
        conversion = convert(state, model, skip_classifier=args.init)
    print(f"{args.source} -> {args.model}: {conversion.report()}")
    if options:
        print(f"options carried with the weights: {json.dumps(options)}")
    partial = args.command == "inflate" or args.init
    problems = conversion.unmatched or conversion.mismatched or (conversion.missing and not partial)
    if problems:
        hint = "" if partial else "; for an initialisation (ImageNet) checkpoint pass --init"
        print(f"nonlocalnet {args.command}: error: the checkpoint does not fit {args.model}; nothing written{hint}",
              file=sys.stderr)
        return 1
    classes = None
    if getattr(args, "classes", None):
        from .data.datasets import read_classes

        classes = read_classes(args.classes)
        if len(classes) != args.num_classes:
            raise ValueError(f"classes: expected {args.num_classes} names (--num-classes), got {len(classes)} in "
                             f"{args.classes}")
    elif args.command == "convert" and not args.init and args.num_classes == 400:
        classes = weights.kinetics400_classes()
    meta = {"source": os.path.basename(args.source), "from": peer if args.command == "convert" else "torchvision",
            "kept_initialised": conversion.missing, "zeroed": conversion.zeroed}
    weights.save_weights(conversion.state_dict, args.out, model=args.model, meta=meta, options=options,
                         classes=classes)
    print(f"wrote {args.out} (load with nonlocalnet.create_model({args.model!r}, weights=...))")
    return 0


def _recipe(name: str | None, default: str = "default") -> str:
    """A config path, or the name of a recipe shipped in nonlocalnet/configs (default: ``default``)."""
    from importlib import resources

    if name is not None and (os.path.sep in name or os.path.exists(name)):
        return name
    stem = (name or default).removesuffix(".yaml")
    path = resources.files("nonlocalnet") / "configs" / f"{stem}.yaml"
    if not path.is_file():
        shipped = sorted(p.name.removesuffix(".yaml") for p in (resources.files("nonlocalnet") / "configs").iterdir()
                         if p.name.endswith(".yaml"))
        raise FileNotFoundError(f"config: expected a YAML file or a shipped recipe ({', '.join(shipped)}), got {name!r}")
    return str(path)


def _logging() -> None:
    import logging

    from . import distributed

    logging.basicConfig(level=logging.INFO if distributed.is_main() else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")


def _train(args: argparse.Namespace) -> int:
    from . import engine
    from .config import Config

    return _training(args, engine, Config, "default")


def _training(args: argparse.Namespace, jobs, schema, default: str) -> int:
    """``train`` and ``detect train``: the config (a shipped recipe by default), the job, its table."""
    from . import distributed
    from .config import load_config

    cfg = load_config(_recipe(args.config, default), args.set, schema=schema)
    out = args.out or os.path.join("runs", os.path.basename(args.config or default).removesuffix(".yaml"))
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out: expected a folder for the run, got the file {out!r}")
    with distributed.session(timeout=cfg.train.timeout) as main:
        _logging()
        summary = jobs.train_job(cfg, out, resume=args.resume)
    if main:
        print(jobs.summary_table(summary))
        print(f"wrote {os.path.join(out, 'summary.json')}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from . import distributed, engine
    from .config import load_config

    _output_file(args.json, "json")
    cfg = load_config(_recipe(args.config), args.set) if args.config else None
    with distributed.session(timeout=cfg and cfg.train.timeout) as main:
        _logging()
        report = engine.evaluate_checkpoint(args.weights, cfg, args.set, clips=args.clips, crops=args.crops,
                                            batch_size=args.batch_size)
    if main:
        print(_json_text({k: v for k, v in report.items() if not isinstance(v, list)}))
        if args.json:
            _write_json(args.json, report)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .engine import predict

    failed = 0
    for row in predict(args.videos, args.weights, top=args.top, clips=args.clips, crops=args.crops):
        if "error" in row:
            failed += 1
            print(f"{row['video']}: error: {row['error']}")
            continue
        print(row["video"] + ": " + ", ".join(f"{label} {p:.3f}" for label, p in row["top"]))
    return 1 if failed else 0


def _detect_train(args: argparse.Namespace) -> int:
    from . import detect
    from .config import DetectConfig

    return _training(args, detect, DetectConfig, "detect_shapes")


def _detect_evaluate(args: argparse.Namespace) -> int:
    from . import detect, distributed
    from .config import DetectConfig, load_config

    _output_file(args.json, "json")
    cfg = load_config(_recipe(args.config), args.set, schema=DetectConfig) if args.config else None
    with distributed.session(timeout=cfg and cfg.train.timeout) as main:
        _logging()
        report = detect.evaluate_checkpoint(args.weights, cfg, args.set, batch_size=args.batch_size)
    if main:
        print(detect.summary_table({"model": report}))
        print(_json_text(report))
        if args.json:
            _write_json(args.json, report)
    return 0


def _cli_model(args: argparse.Namespace):
    """The model of ``--model NAME [--checkpoint WEIGHTS]`` or of a training ``--checkpoint``, with
    its clip length and sampling rate (``--frames`` / ``--rate`` when given)."""
    import logging

    from .checkpoint import load_checkpoint
    from .models import create_model, model_card

    frames, rate = args.frames, getattr(args, "rate", None)
    state = load_checkpoint(args.checkpoint, mmap=True) if args.checkpoint else {}  # its keys, not its tensors
    if isinstance(state, dict) and {"classes", "config", "model"} <= set(state):  # a `nonlocalnet train` checkpoint
        from .engine import load_trained

        model, cfg = load_trained(args.checkpoint)[:2]
        _same_model(args, cfg.model.name)
        return model, frames or cfg.data.frames, rate or cfg.data.rate
    from .weights import FORMAT

    saved = state if isinstance(state, dict) and state.get("format") == FORMAT else {}  # save_weights / convert
    if saved.get("model"):
        _same_model(args, saved["model"])
    name = args.model or saved.get("model")
    if not name:
        raise ValueError("model: expected --model NAME (with --checkpoint for trained weights) or a training "
                         "--checkpoint")
    card = model_card(name)
    classifier = saved.get("state_dict", {}).get("pred.weight")
    count = args.num_classes if classifier is None else classifier.shape[0]
    model = create_model(name, num_classes=count, weights=args.checkpoint)
    if not args.checkpoint:
        logging.getLogger("nonlocalnet").warning("no --checkpoint: random weights")
    return model, frames or card.frames, rate or card.rate


def _same_model(args: argparse.Namespace, held: str) -> None:
    """A model name given on the command line is the one the checkpoint holds (``held``; empty: a
    ResNet3d built from a training config's fields)."""
    if args.model and args.model != held:
        flag = "NAME" if args.command == "export" else "--model"
        what = f"{held!r}; give that name" if held else "a ResNet3d built from its config's fields, no zoo model;"
        raise ValueError(f"model: {flag} is {args.model!r} but {args.checkpoint} holds {what} or leave {flag} out")


def _visualize(args: argparse.Namespace) -> int:
    from . import visualize

    _output_file(args.out, "out")
    model, frames, rate = _cli_model(args)
    queries = [_query(text) for text in args.queries or []]
    clip, pixels = visualize.load_clip(args.video, frames, rate, args.size)
    result = visualize.visualize_clip(model, clip, pixels, args.block, args.out, queries=queries, count=args.count,
                                      top=args.top, mode=args.mode, show=args.show)
    for k, query in enumerate(result["queries"]):
        strongest = query["targets"][0]
        print(f"query {k + 1}: frame {query['frame']} ({query['y']:.0f}, {query['x']:.0f}) -> strongest key frame "
              f"{strongest['frame']} ({strongest['y']:.0f}, {strongest['x']:.0f}) weight {strongest['weight']:.3f}")
    print(f"wrote {result['png']} and {result['gif']}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_model

    name = args.model or os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint or ".")))
    out = args.out or f"{name}.{ {'onnx': 'onnx', 'torchscript': 'ts', 'pt2': 'pt2'}[args.format] }"
    _output_file(out, "out")
    model, frames, _ = _cli_model(args)
    report = export_model(model, out, args.format, frames=frames, size=args.size, atol=args.atol)
    print(f"wrote {report['path']} ({args.format}; dynamic {report['dynamic']}); checked on a clip of shape "
          f"{tuple(report['checked'])}: max abs error {report['max_abs_error']:.2e}")
    return 0


def _query(text: str) -> tuple[int, float, float]:
    parts = text.split(",")
    try:
        frame, y, x = int(parts[0]), float(parts[1]), float(parts[2])
    except (ValueError, IndexError):
        raise ValueError(f"queries: expected FRAME,Y,X pixel positions of the clip, got {text!r}") from None
    if len(parts) != 3:
        raise ValueError(f"queries: expected FRAME,Y,X pixel positions of the clip, got {text!r}")
    return frame, y, x


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def _training_arguments(p: argparse.ArgumentParser, handler, default: str) -> None:
    p.add_argument("config", nargs="?", help=f"YAML config or shipped recipe name (default: {default})")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. optim.lr=0.005")
    p.add_argument("--out", help="output folder (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.set_defaults(handler=handler)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (the usage is in ``--help``) and whose
    every command takes ``--debug``; the parsers of the commands are of this class too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="on an error, raise it with its traceback instead of the one-line message")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nonlocalnet", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"nonlocalnet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    _training_arguments(commands.add_parser(
        "train", help="train (default: the built-in C2D vs non-local job on synthetic videos)"), _train, "default")

    p = commands.add_parser("evaluate", help="multi-view test of a trained checkpoint or converted weights on data.val")
    p.add_argument("config", nargs="?", help="config whose data.val to use (default: the checkpoint's; needed for "
                                             "converted weights)")
    p.add_argument("--weights", required=True, help="checkpoint.pt of a training run, or a zoo model's weights "
                                                    "(nonlocalnet convert output)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--clips", type=_positive, help="clips per video (default: the config's, paper 10)")
    p.add_argument("--crops", type=int, choices=(1, 3), help="crops per clip (default: the config's, paper 3)")
    p.add_argument("--batch-size", type=_positive, default=8)
    p.add_argument("--json", help="also write the full report (per-class accuracy, confusion) here")
    p.set_defaults(handler=_evaluate)

    p = commands.add_parser("predict", help="top labels of videos with a trained checkpoint or converted weights")
    p.add_argument("videos", nargs="+", metavar="VIDEO")
    p.add_argument("--weights", required=True, help="checkpoint.pt of a training run, or a zoo model's weights "
                                                    "(nonlocalnet convert output: its class names are shown)")
    p.add_argument("--top", type=_positive, default=5)
    p.add_argument("--clips", type=_positive)
    p.add_argument("--crops", type=int, choices=(1, 3))
    p.set_defaults(handler=_predict)

    p = commands.add_parser("detect", help="COCO detection, masks and keypoints with non-local Mask R-CNN "
                                           "(extra: detection)")
    detect = p.add_subparsers(dest="detect_command", required=True)
    _training_arguments(detect.add_parser(
        "train", help="train and COCO-evaluate a detector (default: Mask R-CNN with and without its non-local "
                      "block on the built-in shapes set)"), _detect_train, "detect_shapes")
    p = detect.add_parser("evaluate", help="COCOeval (box, mask, keypoint AP) of a detection checkpoint")
    p.add_argument("config", nargs="?", help="config whose validation set to use (default: the checkpoint's)")
    p.add_argument("--weights", required=True, help="checkpoint.pt of a detection training run")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--batch-size", type=_positive, default=2, help="images per process")
    p.add_argument("--json", help="also write the report here")
    p.set_defaults(handler=_detect_evaluate)

    p = commands.add_parser("visualize", help="what a non-local block attends to in a video (paper Fig. 1 and 3)")
    p.add_argument("video", metavar="VIDEO")
    p.add_argument("--model", help="zoo name (see `nonlocalnet models`); not needed with a training checkpoint or "
                                   "a weights file that names it (convert output)")
    p.add_argument("--checkpoint", help="weights file of the zoo model, or a `nonlocalnet train` checkpoint.pt")
    p.add_argument("--block", required=True, help="the block, by the residual block it follows, e.g. res3.1")
    p.add_argument("--queries", nargs="*", metavar="FRAME,Y,X", help="query pixels of the clip (default: the "
                                                                     "--count positions the block changes most)")
    p.add_argument("--count", type=_positive, default=3, help="automatic queries (default 3)")
    p.add_argument("--top", type=_positive, default=20, help="arrows per query: its highest weights (default 20)")
    p.add_argument("--mode", choices=("arrows", "heatmap"), default="arrows")
    p.add_argument("--frames", type=_positive, help="clip length (default: the model's)")
    p.add_argument("--rate", type=_positive, help="sampling rate (default: the model's)")
    p.add_argument("--size", type=_positive, default=224, help="shorter side and centre crop (default 224)")
    p.add_argument("--show", type=_positive, default=8, help="frames in the picture (default 8)")
    p.add_argument("--num-classes", type=_positive, default=400)
    p.add_argument("--out", default="attention.png", help="PNG path; the GIF goes beside it")
    p.set_defaults(handler=_visualize)

    p = commands.add_parser("export", help="a zoo or trained model as ONNX, TorchScript or PT2, checked against "
                                           "PyTorch")
    p.add_argument("model", nargs="?", help="zoo name; not needed with a training --checkpoint or a weights file "
                                            "that names it (convert output)")
    p.add_argument("--checkpoint", help="weights file of the zoo model, or a `nonlocalnet train` checkpoint.pt")
    p.add_argument("--format", choices=("onnx", "torchscript", "pt2"), default="onnx")
    p.add_argument("--out", help="output file (default NAME.onnx / .ts / .pt2)")
    p.add_argument("--frames", type=_positive, help="example clip length (default: the model's)")
    p.add_argument("--size", type=_positive, default=224, help="input height and width (fixed; default 224)")
    p.add_argument("--num-classes", type=_positive, default=400)
    p.add_argument("--atol", type=float, default=1e-4, help="largest allowed difference from PyTorch")
    p.set_defaults(handler=_export)

    p = commands.add_parser("bench", help="time and check the block's fast paths against the naive reference")
    p.add_argument("--shape", default="res4", help=f"{' | '.join(SHAPES)}, or sizes 'B,C,T,H,W' (default res4)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--impls", nargs="+", default=["auto", "naive"], choices=IMPLS,
                   help="attention implementations to time (default: auto naive)")
    p.add_argument("--repeats", type=_positive, default=3, help="timed runs per case; the median is shown")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--forward-only", action="store_true", help="skip the training step (forward + backward)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.set_defaults(handler=_bench)

    p = commands.add_parser("info", help="parameters and FLOPs per stage of a zoo model")
    p.add_argument("model", help="a zoo name (see `nonlocalnet models`)")
    p.add_argument("--frames", type=_positive, help="input frames (default: the model's)")
    p.add_argument("--size", type=_positive, default=224,
                   help="input height and width (default 224; the test views are 256)")
    p.add_argument("--num-classes", type=_positive, default=400)
    p.add_argument("--inflation", choices=["c2d", "3x1x1", "3x3x3"], help="override the model's inflation")
    p.set_defaults(handler=_info)

    p = commands.add_parser("models", help="list the zoo: input, size, cost and the paper's and official accuracy")
    p.add_argument("pattern", nargs="?", help="shell pattern, e.g. 'i3d*_r50'")
    p.set_defaults(handler=_models)

    p = commands.add_parser("recipes", help="each row of the paper's Tables 2-6 and the shipped config that trains it")
    p.add_argument("table", nargs="?", help="a table (2a, 2g, 4, ...) or a shell pattern such as '2*' (default: all)")
    p.set_defaults(handler=_recipes)

    p = commands.add_parser("convert", help="a trained checkpoint of the official Caffe2 release, mmaction2 or "
                                            "PySlowFast -> our weights file (with the options it needs)")
    p.add_argument("source", metavar="IN", help="official .pkl, mmaction2 .pth or PySlowFast .pyth")
    p.add_argument("out", metavar="OUT.pt")
    p.add_argument("--from", dest="peer", choices=("caffe2", "mmaction2", "slowfast"), default="caffe2",
                   help="whose checkpoint (default caffe2: the official release)")
    p.add_argument("--model", required=True, help="the zoo model the checkpoint belongs to, e.g. i3d_nl5_r50 "
                                                  "(mmaction2's I3D NL 32x2) or i3d_nl5_r50_8x8 (PySlowFast's I3D NLN)")
    p.add_argument("--num-classes", type=_positive, default=400)
    p.add_argument("--mode", choices=("embedded_gaussian", "dot_product", "gaussian", "concatenation"),
                   help="the non-local blocks' mode, over the checkpoint's config; needed without one (mmaction2's "
                        "embedded Gaussian and dot-product blocks have the same keys)")
    p.add_argument("--use-scale", action=argparse.BooleanOptionalAction, default=None,
                   help="mmaction2: its non_local_cfg use_scale (default: the checkpoint's config, mmcv's True "
                        "where it leaves use_scale out; without a config False, the value of mmaction2's configs)")
    p.add_argument("--classes", help="class names, one per line, kept with the weights (default: the "
                                     "Kinetics-400 names when there are 400 classes)")
    p.add_argument("--init", action="store_true",
                   help="an initialisation checkpoint (the ImageNet pretrain): entries the model has no use for "
                        "are still errors, but missing entries and a classifier of another size keep their "
                        "initialisation")
    p.set_defaults(handler=_convert)

    p = commands.add_parser("inflate", help="torchvision 2-D ResNet-50/101 weights -> a C2D/I3D zoo model")
    p.add_argument("source", metavar="RESNET2D.pth")
    p.add_argument("out", metavar="OUT.pt")
    p.add_argument("--model", required=True, help="the zoo model to inflate into, e.g. i3d_r50")
    p.add_argument("--num-classes", type=_positive, default=400)
    p.add_argument("--inflation", choices=["c2d", "3x1x1", "3x3x3"],
                   help="override the model's inflation (3x3x3: Table 2e's other I3D)")
    p.set_defaults(handler=_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version or a usage error (its one line printed)
        return done.code if isinstance(done.code, int) else 0
    try:
        return args.handler(args)
    except Exception as err:  # not KeyboardInterrupt or SystemExit
        if getattr(args, "debug", False):
            raise
        command = " ".join(filter(None, (args.command, getattr(args, "detect_command", None))))
        rank = os.environ.get("RANK", "0") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "0"
        where = "" if rank == "0" else f"rank {rank}: "  # under torchrun every rank tells its own
        print(f"nonlocalnet {command}: error: {where}{error_message(err)}", file=sys.stderr)
        return 2


def error_message(err: BaseException) -> str:
    """``err`` on one line: bad input (``ValueError``, a missing extra's ``ImportError``) and ranks
    that failed or did not arrive under torchrun as the message, which names them; an ``OSError``
    with its path; anything else with its type and the hint to run with ``--debug``."""
    from .distributed import CollectiveError

    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        paths = " -> ".join(os.fspath(p) for p in (err.filename, err.filename2) if p is not None)
        return f"{paths}: {err.strerror}"
    if isinstance(err, (ValueError, FileNotFoundError, CollectiveError)) or (isinstance(err, ImportError)
                                                                             and "nonlocalnet[" in text):
        return text or type(err).__name__
    return f"{type(err).__name__}{': ' + text if text else ''} (run with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
