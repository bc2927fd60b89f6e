"""`make demo`: the whole job offline, on generated data.

Generates a LAION-style dataset of synthetic captioned images with planted faults
(wrong captions, broken URLs, too-small and extreme-aspect images), serves it from
127.0.0.1, runs `curate run configs/demo.yaml` as a user would, and says where the
results are.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from curate.pipeline.demo.devserver import DevServer
from curate.pipeline.demo.synthetic import generate_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--data", default="demo-data")
    parser.add_argument("--config", default="configs/demo.yaml")
    args, extra = parser.parse_known_args(argv)

    data = Path(args.data)
    shutil.rmtree(data, ignore_errors=True)
    (data / "images").mkdir(parents=True)
    with DevServer(data) as server:
        started = time.time()
        print(f"generating {args.rows} captioned images with planted faults into {data}/ ...", flush=True)
        urls = generate_dataset(data, args.rows, base_url=server.base_url, seed=0)
        print(f"  done in {time.time() - started:.1f}s; serving them at {server.base_url}", flush=True)
        command = [sys.executable, "-m", "curate.pipeline.cli", "run", args.config,
                   "--set", f"input.paths=[{urls}]", "--overwrite", *extra]
        print("$ curate run " + " ".join(command[4:]), flush=True)
        code = subprocess.call(command)
    if code == 0:
        print("\nThe demo's results:")
        print("  final WebDataset shards and per-shard parquet:  demo-output/shards/")
        print("  totals per rejection reason:                    demo-output/stats.json")
        print("  the resolved config:                            demo-output/config.yaml")
        # Last, so it is the line the user sees: the report is where thresholds get tuned.
        print(f"\nThe run report (open it in a browser): {Path('demo-output', 'report.html').resolve()}")
    return code


if __name__ == "__main__":
    sys.exit(main())
