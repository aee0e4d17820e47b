"""Command line: ``tokenthrift train|eval|assign-labels|macs|bench|visualize|demo|recipes``. Argument parsing only; the
work happens in the modules it calls."""
from __future__ import annotations

import argparse
import sys

from .train.config import (
    LTM_FIELDS,
    MODEL_FIELDS,
    TOE_FIELDS,
    add_config_arguments,
    config_from_args,
    recipe_names,
)


def _model(args):
    """Model, input size and config for macs/bench/visualize: timm defaults (1000 classes) unless
    overridden by a recipe or flags."""
    from .train import build_model, model_input_size

    cfg = config_from_args(args, num_classes=1000, data="imagefolder:-")
    model = build_model(cfg)
    return model, model_input_size(model, cfg), cfg


def _toe_kwargs(cfg) -> dict:
    return dict(r0=cfg.toe_r0, keep_rates=cfg.toe_keep_rates, milestones=cfg.toe_milestones, k=cfg.toe_k,
                distance=cfg.toe_distance)


def _ltm_pair(model, cfg):
    """(base, LTM) in eval mode: the model converted with --ltm-ratio (or its calibrated ratios; an ltm_*
    model as it is), and the plain model under it."""
    import copy

    from . import ltm
    from .ltm.methods import parse_ratio
    from .ltm.models import prepare

    merged = prepare(model, cfg.model, parse_ratio(cfg.ltm_ratio), tau_s=cfg.ltm_tau_s).eval()
    return ltm.remove(copy.deepcopy(merged)).eval(), merged


def _method(args, cfg, default: str = "full") -> str:
    """--method, else the recipe's method where it is toe or ltm (ltm for an ``ltm_*`` model), else ``default``."""
    if args.method:
        return args.method
    if cfg.method in ("toe", "ltm"):
        return cfg.method
    return "ltm" if cfg.model.startswith("ltm_") else default


def cmd_train(args) -> None:
    from . import report
    from .train import train

    summary = train(config_from_args(args))
    rows = [{k: r.get(k, "-") for k in ("epoch", "train_loss", "top1", "top1_ema", "train_time_s", "images_per_s",
                                         "train_macs")} for r in summary["history"]]
    for r in rows:
        r["train_macs"] = r["train_macs"] / 1e6
    print(report.table(rows).replace("train_macs", "train_MMACs"))
    print(f"top-1 {summary['top1']:.2f}  training {summary['train_time_s']:.1f} s  "
          f"mean training MACs {summary['macs_ratio']:.3f} of full  ->  {summary['run_dir']}")


def cmd_assign_labels(args) -> None:
    from .revit.pipeline import label_split

    labels, info = label_split(args.checkpoint, args.split, args.out, margin=args.margin,
                               batch_size=args.batch_size, data_dir=args.data_dir, ema=args.ema)
    total = max(len(labels), 1)
    print("grid  images  share")
    for g, count in zip(info["grids"], info["histogram"]):
        print(f"{g:>4}  {count:>6}  {count / total:.3f}")
    print(f"{len(labels)} labels ({args.split} split) -> {args.out}")


def cmd_eval_adaptive(args) -> None:
    from . import report
    from .revit.pipeline import adaptive_report

    if not args.assigner:
        raise ValueError("eval --adaptive needs --assigner CHECKPOINT (a --method tla run)")
    gammas = [None] + list(args.gamma or [])
    rows = adaptive_report(args.checkpoint, args.assigner, gammas, batch_size=args.batch_size,
                           data_dir=args.data_dir, oracle_labels=args.oracle_labels,
                           throughput_batch=args.throughput_batch)
    print(report.table(rows))


def cmd_eval(args) -> None:
    import torch

    if args.adaptive:
        return cmd_eval_adaptive(args)

    from . import measure, report
    from .data import build_dataset
    from .train import evaluate, load_trained, model_input_size

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    rows = []
    for ema in ([False, True] if args.ema else [False]):
        model, cfg = load_trained(args.checkpoint, ema=ema, device=device)
        c, h, _ = model_input_size(model, cfg)
        ds, _ = build_dataset(args.data or cfg.data, False, h, c, args.data_dir or cfg.data_dir,
                              subset=args.eval_subset, seed=cfg.seed)
        loader = torch.utils.data.DataLoader(ds, args.batch_size, num_workers=args.workers)
        rows.append({"weights": "EMA" if ema else "model", "images": len(ds),
                     "top1": evaluate(model, loader, torch.device(device)),
                     "GMACs": measure.macs(model, (c, h, h)) / 1e9})
    print(report.table(rows))


def cmd_macs(args) -> None:
    from . import bench, measure, report

    model, size, cfg = _model(args)
    method = _method(args, cfg)
    if method == "toe":
        rows = bench.toe_macs_rows(model, size, epochs=args.epochs, **_toe_kwargs(cfg))
    elif method == "ltm":
        rows = bench.ltm_macs_rows(*_ltm_pair(model, cfg), size, label=cfg.model.removeprefix("ltm_"))
    else:
        rows = [{"model": cfg.model, "input": "x".join(map(str, size)), "GMACs": measure.macs(model, size) / 1e9,
                 "params_M": sum(p.numel() for p in model.parameters()) / 1e6}]
    print(report.table(rows))


def cmd_bench(args) -> None:
    import torch

    from . import bench, report

    model, size, cfg = _model(args)
    method = _method(args, cfg, default="toe")
    if args.threads:
        torch.set_num_threads(args.threads)
    if method == "toe":
        rows = bench.toe_speed_rows(model.to(args.device), size, args.batch_size, train=True, warmup=args.warmup,
                                    repeats=args.repeats, **_toe_kwargs(cfg))
        step = "training step (fwd+bwd+AdamW)"
    else:
        base, merged = (m.to(args.device) for m in _ltm_pair(model, cfg))
        rows = bench.ltm_speed_rows(base, merged, size, args.batch_size, warmup=args.warmup, repeats=args.repeats,
                                    label=cfg.model.removeprefix("ltm_"))
        step = "inference (no grad)"
    print(f"{cfg.model} {'x'.join(map(str, size))}, batch {args.batch_size}, {step}, {args.device}, fp32, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(report.table(rows))


def cmd_visualize(args) -> None:
    import torch

    from .data import build_dataset
    from .train import build_model, load_trained, model_input_size

    if args.checkpoint:
        model, cfg = load_trained(args.checkpoint)
    else:
        cfg = config_from_args(args, num_classes=1000)
        model = build_model(cfg).eval()
    method = args.method or ("ltm" if cfg.method == "ltm" else "toe")
    c, h, _ = model_input_size(model, cfg)
    ds, _ = build_dataset(args.data or cfg.data, False, h, c, args.data_dir or cfg.data_dir)
    if len(ds) < args.images:
        raise ValueError(f"--images {args.images} but the dataset has {len(ds)} images")
    images = torch.stack([ds[i][0] for i in range(args.images)])
    out = _visualize_ltm(model, cfg, images, args) if method == "ltm" else _visualize_toe(model, cfg, images, args)
    print(out)


def _visualize_toe(model, cfg, images, args):
    import torch

    from . import toe, viz

    schedule = toe.ToESchedule(**_toe_kwargs(cfg))
    with torch.no_grad():  # block-0 output, exactly what the ToE operator sees in training
        x = model.blocks[0](model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images)))))
    rates = schedule.keep_rates[: args.stage] if args.stage is not None else schedule.rates(0)
    kept, groups = toe.expansion_groups(x, rates, schedule.r0, schedule.k, model.num_prefix_tokens,
                                        schedule.distance)
    title = f"ToE {cfg.model}: keep {rates[-1] if rates else schedule.r0} ({kept.shape[1]} of {groups.shape[1]} tokens)"
    return viz.plot_token_groups(images, groups, kept, tuple(model.patch_embed.grid_size), args.out, title)


def _visualize_ltm(model, cfg, images, args):
    from . import ltm, viz

    if not ltm.is_ltm(model):
        model = _ltm_pair(model, cfg)[1]
    maps = ltm.merge_maps(model, images)
    if not maps:
        raise ValueError("no merge site of this model merged anything at this input size (every ratio kept "
                         "its grid); lower --ltm-ratio")
    if args.sites:
        chosen = [m for m in maps if any(m.site.startswith(s) for s in args.sites)]
        if not chosen:
            raise ValueError(f"--sites {args.sites} matched none of the merge sites: "
                             f"{', '.join(m.site for m in maps)}")
        maps = chosen
    elif len(maps) > 3:  # first, middle and last merge
        maps = [maps[0], maps[len(maps) // 2], maps[-1]]
    title = f"LTM {cfg.model}: colour = merged token, brightness = weight in it"
    return viz.plot_merge_maps(images, maps, args.out, title)


def cmd_demo(args) -> None:
    from . import demo

    demo.main(epochs=args.epochs, train_subset=args.train_subset, eval_subset=args.eval_subset, output=args.output,
              seed=args.seed, progress=not args.quiet, data_dir=args.data_dir, adaptive=not args.no_adaptive,
              merging=not args.no_ltm)


def cmd_recipes(args) -> None:
    for name in recipe_names():
        print(name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenthrift", description="Spend fewer tokens in timm ViTs.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a timm model (full tokens or --method toe)")
    p.add_argument("-c", "--config", help="YAML recipe file, or a shipped recipe name (tokenthrift recipes)")
    add_config_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="top-1 and MACs of a tokenthrift checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--ema", action="store_true", help="also evaluate the EMA weights")
    p.add_argument("--data", help="dataset (default: the one it was trained on)")
    p.add_argument("--data-dir")
    p.add_argument("--eval-subset", type=int)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--adaptive", action="store_true",
                   help="ReViT + TLA: --checkpoint is the revit run, --assigner the tla run")
    p.add_argument("--assigner", help="checkpoint of the --method tla run (with --adaptive)")
    p.add_argument("--gamma", type=float, nargs="+", help="also evaluate these cumulative-probability thresholds")
    p.add_argument("--oracle-labels", help="assign-labels file of the eval split: adds the oracle row")
    p.add_argument("--throughput-batch", type=int, default=256)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("assign-labels", help="ReViT: token-length label of each image (smallest correct grid)")
    p.add_argument("--checkpoint", required=True, help="checkpoint of a --method revit run")
    p.add_argument("--split", choices=["train", "eval"], default="train",
                   help="label the images the run trained on, or its evaluation images")
    p.add_argument("--out", required=True, help="label file to write (read by train --method tla)")
    p.add_argument("--margin", type=float, default=0.0, help="also require this true-class probability")
    p.add_argument("--ema", action="store_true", help="label with the EMA weights")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--data-dir")
    p.set_defaults(func=cmd_assign_labels)

    for name, func, helptext in (("macs", cmd_macs, "MACs per image (per ToE stage, or LTM against its base)"),
                                 ("bench", cmd_bench, "measured speed of a method against its baseline, same run")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("-c", "--config", help="take the model and method settings from a recipe")
        add_config_arguments(p, only=MODEL_FIELDS + TOE_FIELDS + LTM_FIELDS)
        p.add_argument("--method", choices=["full", "toe", "ltm"] if name == "macs" else ["toe", "ltm"],
                       help="default: the recipe's method if it is toe or ltm, else " + ("full" if name == "macs" else "toe"))
        if name == "macs":
            p.add_argument("--epochs", type=int, help="training length for the mean over the ToE schedule")
        else:
            p.add_argument("--batch-size", type=int, default=64)
            p.add_argument("--warmup", type=int, default=2)
            p.add_argument("--repeats", type=int, default=5)
            p.add_argument("--device", default="cpu")
            p.add_argument("--threads", type=int)
        p.set_defaults(func=func)

    p = sub.add_parser("visualize", help="what a method did to the tokens: ToE kept patches and merge groups, "
                                         "or LTM merge maps")
    p.add_argument("--method", choices=["toe", "ltm"], help="default: ltm for an LTM run or recipe, else toe")
    p.add_argument("--checkpoint", help="trained tokenthrift checkpoint (default: an untrained model)")
    p.add_argument("-c", "--config", help="recipe for the model and method settings when no checkpoint is given")
    add_config_arguments(p, only=MODEL_FIELDS + TOE_FIELDS + LTM_FIELDS)
    p.add_argument("--data", help="dataset to draw images from")
    p.add_argument("--data-dir")
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--stage", type=int, help="ToE stage to show (default: the first)")
    p.add_argument("--sites", nargs="+", help="LTM merge sites to show, by module-name prefix "
                                              "(default: the first, middle and last merge)")
    p.add_argument("--out", default="runs/tokens.png")
    p.set_defaults(func=cmd_visualize)

    p = sub.add_parser("demo", help="the main job: tiny ViT on Fashion-MNIST: ToE training, ReViT + TLA "
                                          "inference, LTM merging")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-subset", type=int, default=7000)
    p.add_argument("--eval-subset", type=int, default=5000, help="test images (a fixed random subset)")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-adaptive", action="store_true", help="skip the ReViT + TLA part")
    p.add_argument("--no-ltm", action="store_true", help="skip the LTM part")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("recipes", help="list the shipped recipes (use with train --config NAME)")
    p.set_defaults(func=cmd_recipes)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        if getattr(args, "debug", False):
            raise
        print(f"tokenthrift {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
