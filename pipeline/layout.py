"""Where a run keeps what: one object instead of path arithmetic spread over the stages.

    config.yaml            the resolved config of the run
    work/input/            input shards (NNNNN.parquet) cut from the URL lists
    work/download/         raw shards (removed once written, unless output.keep_intermediate)
    work/score/            done-markers of the score stage (with similarity histograms)
    work/dedup/            the dedup filter's global pass (pipeline/dedup.py)
    embeddings/            CLIP embeddings, row-aligned: img_emb/, text_emb/, metadata/
    shards/NNNNN.tar       final WebDataset shards
    shards/NNNNN.parquet   every row of the shard, kept or rejected, with its reason
    shards/NNNNN.done.json the shard's stats, written last
    stats.json             the run's totals: rows in = written + rejected, per reason
    report.html            the run report (pipeline/report.py)
    report/samples/        its thumbnails, chosen by the write stage (pipeline/report_samples.py)
"""

from __future__ import annotations

from pathlib import Path


class RunLayout:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.input = self.root / "work" / "input"
        self.download = self.root / "work" / "download"
        self.score = self.root / "work" / "score"
        self.dedup = self.root / "work" / "dedup"
        self.embeddings = self.root / "embeddings"
        self.shards = self.root / "shards"
        self.stats = self.root / "stats.json"
        self.report = self.root / "report.html"
        self.report_samples = self.root / "report" / "samples"
