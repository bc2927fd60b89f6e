"""Where a run keeps what: every file name of a run, in one object, instead of path arithmetic
spread over the stages.

    config.yaml            the resolved config of the run
    work/input/            input shards (NNNNN.parquet) cut from the URL lists
    work/download/         raw shards (removed once written, unless output.keep_intermediate)
    work/score/            done-markers of the score stage (with similarity histograms)
    work/dedup/            the dedup filter's global pass (pipeline/stages/dedup.py)
    embeddings/            CLIP embeddings, row-aligned (the layout clip-retrieval reads):
        img_emb/img_emb_NNNNN.npy, text_emb/text_emb_NNNNN.npy, metadata/metadata_NNNNN.parquet
    shards/NNNNN.tar       final WebDataset shards
    shards/NNNNN.parquet   every row of the shard, kept or rejected, with its reason
    shards/NNNNN.done.json the shard's stats, written last
    stats.json             the run's totals: rows in = written + rejected, per reason
    report.html            the run report (pipeline/report/page.py)
    report/samples/        its thumbnails (pipeline/report/samples.py): NNNNN.parquet chosen by the write stage,
                           NNNNN.download.parquet by the download stage (images it dropped)
"""

from __future__ import annotations

from pathlib import Path

from curate.pipeline.shards import shard_name

EMBEDDING_PARTS = ("img_emb", "text_emb", "metadata")


def embedding_files(folder: str | Path, shard_id: int) -> dict[str, Path]:
    """The score stage's files for one shard under an embeddings folder, by part."""
    folder, name = Path(folder), shard_name(shard_id)
    return {
        "img_emb": folder / "img_emb" / f"img_emb_{name}.npy",
        "text_emb": folder / "text_emb" / f"text_emb_{name}.npy",
        "metadata": folder / "metadata" / f"metadata_{name}.parquet",
    }


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

    def input_shard(self, shard_id: int) -> Path:
        return self.input / f"{shard_name(shard_id)}.parquet"

    def download_files(self, shard_id: int) -> dict[str, Path]:
        name = shard_name(shard_id)
        return {"tar": self.download / f"{name}.tar", "parquet": self.download / f"{name}.parquet"}

    def embedding_files(self, shard_id: int) -> dict[str, Path]:
        return embedding_files(self.embeddings, shard_id)

    def report_samples_file(self, shard_id: int) -> Path:
        return self.report_samples / f"{shard_name(shard_id)}.parquet"

    def report_download_samples_file(self, shard_id: int) -> Path:
        """Thumbnails of the images the download stage dropped after fetching them."""
        return self.report_samples / f"{shard_name(shard_id)}.download.parquet"
