"""The `curate` command line.

    curate run CONFIG [--set key.path=value ...] [--overwrite]
    curate stats OUTPUT_DIR          the funnel of a finished run, as a table
    curate report OUTPUT_DIR         rebuild OUTPUT_DIR/report.html
    curate inspect SHARD.tar [-n N]  the first N samples of a shard
    curate train CONFIG [--set ...]  fine-tune a latent diffusion model on the shards (train/)

Problems the user can fix end as one line on stderr and exit code 2; a traceback
only with --debug.
"""

from __future__ import annotations

import argparse
import sys

from curate.pipeline.errors import UserError


def _print_summary(stats: dict, output: str) -> None:
    print(f"\nrows in      {stats['rows_in']:>10}")
    print(f"written      {stats['written']:>10}")
    print(f"rejected     {stats['rejected']:>10}")
    for reason, count in stats["rejected_by_reason"].items():
        print(f"  {reason:<40} {count:>8}")
    print(f"duration     {stats['duration_seconds']:>10.1f} s")
    print(f"throughput   {stats['rows_per_second'] or 0:>10.1f} rows/s, {stats['images_per_second'] or 0:.1f} images/s")
    print(f"output       {output}/shards  (stats: {output}/stats.json)")
    print(f"report       {output}/report.html")


def cmd_run(args: argparse.Namespace) -> int:
    from curate.pipeline.config import load_config
    from curate.pipeline.run import run

    cfg = load_config(args.config, args.set)
    stats = run(cfg, overwrite=args.overwrite, progress=not args.no_progress)
    _print_summary(stats, cfg.output.path)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from curate.pipeline.report.page import format_funnel, open_run, read_config, read_stats

    layout = open_run(args.output)
    print(format_funnel(read_stats(layout), read_config(layout)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from curate.pipeline.report.page import build_report

    print(build_report(args.output))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from curate.pipeline.report.page import describe_samples

    print(describe_samples(args.shard, args.n))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from curate.train.config import load_train_config
    from curate.train.loop import train

    cfg = load_train_config(args.config, args.set)
    summary = train(cfg, overwrite=args.overwrite, until_step=args.until_step, progress=not args.no_progress)
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, one summary
        rate = summary["images_per_second"]
        print(f"\nsteps        {summary['step']:>10}" + ("" if summary["finished"] else "  (stopped; rerun to resume)"))
        print(f"last loss    {summary['loss'] if summary['loss'] is not None else float('nan'):>10.4f}")
        print(f"throughput   {rate or 0:>10.1f} images/s")
        print(f"output       {summary['result'] if summary['finished'] else summary['output']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from curate.train.eval.run import main_from_args

    return main_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curate", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="download, normalize, filter and write WebDataset shards")
    run.add_argument("config", help="YAML config (see configs/)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set input.rows_per_shard=500")
    run.add_argument("--overwrite", action="store_true", help="delete the output folder and start over")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(func=cmd_run)

    stats = sub.add_parser("stats", help="print a finished run's funnel: rows in, per step and reason, written")
    stats.add_argument("output", metavar="OUTPUT_DIR")
    stats.set_defaults(func=cmd_stats)
    report = sub.add_parser("report", help="rebuild OUTPUT_DIR/report.html (curate run writes it too)")
    report.add_argument("output", metavar="OUTPUT_DIR")
    report.set_defaults(func=cmd_report)
    inspect = sub.add_parser("inspect", help="print the first samples of a WebDataset shard: key, caption, json")
    inspect.add_argument("shard", metavar="SHARD.tar")
    inspect.add_argument("-n", type=int, default=3, help="how many samples (default 3)")
    inspect.set_defaults(func=cmd_inspect)

    train = sub.add_parser("train", help="fine-tune a latent diffusion model (diffusers) on the shards; "
                                         "several GPUs: torchrun --nproc-per-node N -m curate.pipeline.cli train ...")
    train.add_argument("config", help="YAML train config (see configs/train-*.yaml)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set training.steps=2000")
    train.add_argument("--overwrite", action="store_true", help="delete the output folder and start over")
    train.add_argument("--until-step", type=int, default=None, metavar="N",
                       help="stop after step N with a checkpoint (a time-limited job); rerun to resume")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="generate with a trained model and measure it: FID, KID, FD in CLIP space, "
                                           "IS, CLIP score, images/s per scheduler and step count (train/eval/)")
    evaluate.add_argument("config", nargs="?", help="YAML eval config (see configs/eval-*.yaml); or none: the options below")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override a config value, e.g. --set generation.batch_size=16")
    evaluate.add_argument("--model", help="a StableDiffusionPipeline folder (curate train's OUTPUT/pipeline), hub id or tiny")
    evaluate.add_argument("--prompts", help="a .txt / .jsonl file of prompts, or held-out shards (their captions)")
    evaluate.add_argument("--reference", help="real images: shards (a curate run output) or a folder of image files")
    evaluate.add_argument("--schedulers", metavar="NAME:STEPS,...", help="e.g. ddpm:1000,ddim:50,pndm:50,dpm++:20")
    evaluate.add_argument("--output", help="where eval.json, eval.html, the grids and images go")
    evaluate.add_argument("--overwrite", action="store_true", help="delete the output folder and start over")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")
    evaluate.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"curate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("curate: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
