"""The `curate` command line.

    curate run CONFIG [--set key.path=value ...] [--overwrite]

Problems the user can fix end as one line on stderr and exit code 2; a traceback
only with --debug.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.errors import UserError


def _print_summary(stats: dict, output: str) -> None:
    print(f"\nrows in      {stats['rows_in']:>10}")
    print(f"written      {stats['written']:>10}")
    print(f"rejected     {stats['rejected']:>10}")
    for reason, count in stats["rejected_by_reason"].items():
        print(f"  {reason:<40} {count:>8}")
    print(f"duration     {stats['duration_seconds']:>10.1f} s")
    print(f"throughput   {stats['rows_per_second'] or 0:>10.1f} rows/s, {stats['images_per_second'] or 0:.1f} images/s")
    print(f"output       {output}/shards  (stats: {output}/stats.json)")


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.run import run

    cfg = load_config(args.config, args.set)
    stats = run(cfg, overwrite=args.overwrite, progress=not args.no_progress)
    _print_summary(stats, cfg.output.path)
    return 0


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
