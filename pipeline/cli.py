"""The `curate` command line.

    curate run CONFIG [--set key.path=value ...] [--overwrite]
    curate stats OUTPUT_DIR          the funnel of a finished run, as a table
    curate report OUTPUT_DIR [B]     rebuild OUTPUT_DIR/report.html; with B, compare the two runs
    curate inspect SHARD.tar [-n N]  the first N samples of a shard
    curate init NAME [PATH]          write one of the shipped configs (laion-subset, demo, ...)
    curate train CONFIG [--set ...]  fine-tune a latent diffusion model on the shards (train/; curate[train])
    curate eval [CONFIG] [...]       measure a trained model: FID, KID, CLIP score, speed (train/eval/; curate[train])

Problems the user can fix end as one line on stderr and exit code 2; a traceback
only with --debug.
"""

from __future__ import annotations

import argparse
import sys

from curate.pipeline.errors import UserError, require_extra
from curate.pipeline.log import LEVELS
from curate.pipeline.log import configure as configure_logging


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("curate")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _count(text: str) -> int:
    """-n: a count of samples, 0 included."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {n}")
    return n


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
    failed = stats.get("failed_shards") or []
    if failed:
        print(f"\nFAILED       {len(failed):>10} shard(s), {stats['rows_in_failed_shards']} rows not processed; "
              "rerun the same command to retry just these:", file=sys.stderr)
        for f in failed:
            print(f"  shard {f['shard']} ({f['step']}): {f['error']}", file=sys.stderr)
        if stats.get("shards_waiting"):
            print(f"  {stats['shards_waiting']} more shard(s), {stats['rows_in_waiting_shards']} rows, wait for them: "
                  "a dataset-wide filter (dedup, a CLIP top_fraction) needs every shard", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from curate.pipeline.config import load_config
    from curate.pipeline.run import run

    cfg = load_config(args.config, args.set)
    stats = run(cfg, overwrite=args.overwrite, progress=not args.no_progress, progress_every=args.progress_every)
    if stats.get("empty_input"):
        return 0  # said as a warning: nothing to do, nothing written
    _print_summary(stats, cfg.output.path)
    return 1 if stats.get("failed_shards") else 0


def cmd_stats(args: argparse.Namespace) -> int:
    from curate.pipeline.report.page import format_funnel, open_run, read_config, read_stats

    layout = open_run(args.output)
    print(format_funnel(read_stats(layout), read_config(layout)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    if args.other is not None:
        from curate.pipeline.report.compare import build_comparison

        print(build_comparison(args.output, args.other, args.out))
        return 0
    from curate.pipeline.report.page import build_report

    if args.out is not None:
        raise UserError("-o/--out names the comparison page: give a second run to compare with (curate report A B -o PATH)")
    print(build_report(args.output))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from curate.pipeline.report.page import describe_samples

    print(describe_samples(args.shard, args.n))
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from curate.configs import names, write

    if args.name is None:
        print("\n".join(names()))
        return 0
    print(write(args.name, args.path, overwrite=args.force))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import os

    require_extra("train", "curate train", ("diffusers", "transformers", "peft"))
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
    require_extra("train", "curate eval", ("diffusers", "transformers", "pytorch_fid"))
    from curate.train.eval.run import main_from_args

    return main_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curate", description="Turn LAION-style URL lists into clean, safe, well-sized WebDataset shards, "
                                   "report on them, and fine-tune latent diffusion models on them.",
        epilog="Typical use: `curate init laion-subset`, edit it, `curate run laion-subset.yaml`, then open the "
               "report.html it writes. `curate COMMAND --help` describes each command.")
    parser.add_argument("--version", action="version", version=f"curate {_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run", help="download, normalize, filter and write WebDataset shards",
        description="Run the pipeline a config describes: read the URL lists, download, score, filter and write "
                    "WebDataset shards, stats.json and report.html into output.path. Rerun the same command to "
                    "resume an interrupted run.")
    run.add_argument("config", help="YAML config (see configs/, or `curate init NAME` for a starting point)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set input.rows_per_shard=500 (repeatable)")
    run.add_argument("--overwrite", action="store_true", help="delete the output folder and start over")
    run.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")
    run.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                     help="when stderr is not a terminal (a batch job's log): a plain progress line this often "
                          "(default 30) instead of bars")
    run.add_argument("--log-file", metavar="PATH", default=None,
                     help="also write the log (progress, warnings, failed shards, debug detail) to this file")
    run.add_argument("--log-level", choices=LEVELS, default="info", help="what reaches stderr (default info)")
    run.set_defaults(func=cmd_run)

    stats = sub.add_parser(
        "stats", help="print a finished run's funnel: rows in, per step and reason, written",
        description="Print the funnel of a finished run as a table: rows in, what each step dropped and why, "
                    "rows written, and the run's throughput (from OUTPUT_DIR/stats.json).")
    stats.add_argument("output", metavar="OUTPUT_DIR", help="a finished run's output folder (output.path)")
    stats.set_defaults(func=cmd_stats)

    report = sub.add_parser(
        "report", help="rebuild OUTPUT_DIR/report.html, or compare two runs",
        description="Rebuild OUTPUT_DIR/report.html (curate run writes it too): funnel, distributions with "
                    "thresholds, samples on both sides of each threshold, why downloads failed. With a second "
                    "run B, write a page comparing the two instead (funnels and score distributions side by "
                    "side). Prints the page's path.")
    report.add_argument("output", metavar="OUTPUT_DIR", help="a finished run's output folder (output.path)")
    report.add_argument("other", metavar="B", nargs="?", default=None,
                        help="another run's output folder, to compare OUTPUT_DIR (A) with")
    report.add_argument("-o", "--out", metavar="PATH", default=None,
                        help="where the comparison page goes (default OUTPUT_DIR/compare-<B's folder name>.html)")
    report.set_defaults(func=cmd_report)

    inspect = sub.add_parser(
        "inspect", help="print the first samples of a WebDataset shard: key, caption, json",
        description="Print the first samples of a WebDataset shard (a .tar curate wrote): each sample's key, "
                    "members and sizes, caption and json metadata. -n 0 prints only how many samples it holds.")
    inspect.add_argument("shard", metavar="SHARD.tar", help="a WebDataset shard, e.g. OUTPUT_DIR/shards/00000.tar")
    inspect.add_argument("-n", type=_count, default=3, metavar="N", help="how many samples to print (default 3)")
    inspect.set_defaults(func=cmd_inspect)

    init = sub.add_parser(
        "init", help="write one of the configs curate ships (curate init laion-subset)",
        description="Write one of the configs curate ships with its package to start from, e.g. "
                    "`curate init laion-subset` writes ./laion-subset.yaml. Without NAME, list them.")
    init.add_argument("name", metavar="NAME", nargs="?", default=None,
                      help="the config's name (without .yaml); omit to list the names")
    init.add_argument("path", metavar="PATH", nargs="?", default=None,
                      help="the file to write, or a folder to write NAME.yaml into (default ./NAME.yaml)")
    init.add_argument("--force", action="store_true", help="replace PATH if it exists")
    init.set_defaults(func=cmd_init)

    train = sub.add_parser(
        "train", help="fine-tune a latent diffusion model (diffusers) on the shards",
        description="Fine-tune a latent diffusion model (diffusers) on the shards a run wrote. Rerun the same command to resume from the last checkpoint. Several GPUs: "
                    "torchrun --nproc-per-node N -m curate.pipeline.cli train CONFIG. Needs the train extra: "
                    "pip install 'curate[train]'.")
    train.add_argument("config", help="YAML train config (see configs/train-*.yaml, or `curate init train-sd15`)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set training.steps=2000")
    train.add_argument("--overwrite", action="store_true", help="delete the output folder and start over")
    train.add_argument("--until-step", type=int, default=None, metavar="N",
                       help="stop after step N with a checkpoint (a time-limited job); rerun to resume")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="generate with a trained model and measure it: FID, KID, FD in CLIP space, "
                                           "IS, CLIP score, images/s per scheduler and step count (train/eval/)",
                              description="Generate images with a trained model from prompts and measure them against "
                                          "real images: FID, KID, FD in CLIP space, IS, CLIP score, and images/s per "
                                          "scheduler and step count; writes eval.json and eval.html. Needs the train "
                                          "extra: pip install 'curate[train]'.")
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
        try:
            configure_logging(getattr(args, "log_level", "info"), getattr(args, "log_file", None))
        except OSError as exc:
            raise UserError(f"cannot write the log file {args.log_file}: {exc.strerror or exc}") from exc
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
