"""Where a run keeps what: every file name of a run, in one object, instead of path arithmetic
spread over the stages.

    config.yaml            the resolved config of the run
    work/input/            input shards cut from the URL lists: FFFFF_SSSSS.parquet (shard SSSSS of input
                           file FFFFF), FFFFF.done.json (the file's cut), _files.json, _done.json
    work/download/         raw shards (removed once written, unless output.keep_intermediate)
    work/score/            done-markers of the score stage (with similarity histograms)
    work/dedup/            the dedup filter's global pass (pipeline/stages/dedup.py)
    embeddings/            CLIP embeddings, row-aligned (the layout clip-retrieval reads):
        img_emb/img_emb_NNNNN.npy, text_emb/text_emb_NNNNN.npy, metadata/metadata_NNNNN.parquet
        (key, url, caption, written: one row per embedded image)
    shards/NNNNN.tar       final WebDataset shards
    shards/NNNNN.parquet   every row of the shard, kept or rejected, with its status and reason
    shards/NNNNN_stats.json img2dataset's per-shard stats (count, successes, failed_to_*, status_dict)
    shards/NNNNN.done.json the shard's stats, written last
    stats.json             the run's totals: rows in = written + rejected, per reason
    report.html            the run report (pipeline/report/page.py)
    report/samples/        its thumbnails (pipeline/report/samples.py): NNNNN.parquet chosen by the write stage,
                           NNNNN.download.parquet by the download stage (images it dropped)
"""

from __future__ import annotations

import os

from curate.pipeline import storage
from curate.pipeline.shards import shard_name

EMBEDDING_PARTS = ("img_emb", "text_emb", "metadata")


def embedding_files(folder: str | os.PathLike, shard_id: int) -> dict[str, str]:
    """The score stage's files for one shard under an embeddings folder, by part."""
    name = shard_name(shard_id)
    return {
        "img_emb": storage.join(folder, "img_emb", f"img_emb_{name}.npy"),
        "text_emb": storage.join(folder, "text_emb", f"text_emb_{name}.npy"),
        "metadata": storage.join(folder, "metadata", f"metadata_{name}.parquet"),
    }


class RunLayout:
    """Every path is a string: a local path, or a URL when output.path is one (pipeline/storage.py)."""

    def __init__(self, root: str | os.PathLike):
        self.root = str(root).rstrip("/") if storage.is_url(root) else str(root)
        join = storage.join
        self.config = join(self.root, "config.yaml")
        self.input = join(self.root, "work", "input")
        self.download = join(self.root, "work", "download")
        self.score = join(self.root, "work", "score")
        self.dedup = join(self.root, "work", "dedup")
        self.embeddings = join(self.root, "embeddings")
        self.shards = join(self.root, "shards")
        self.stats = join(self.root, "stats.json")
        self.report = join(self.root, "report.html")
        self.report_samples = join(self.root, "report", "samples")

    def input_shard(self, file_index: int, local: int) -> str:
        """The `local`-th input shard cut from input file `file_index` (pipeline/reader.py)."""
        return storage.join(self.input, f"{shard_name(file_index)}_{shard_name(local)}.parquet")

    def download_files(self, shard_id: int) -> dict[str, str]:
        name = shard_name(shard_id)
        return {"tar": storage.join(self.download, f"{name}.tar"),
                "parquet": storage.join(self.download, f"{name}.parquet")}

    def shard_files(self, shard_id: int) -> dict[str, str]:
        name = shard_name(shard_id)
        return {"tar": storage.join(self.shards, f"{name}.tar"),
                "parquet": storage.join(self.shards, f"{name}.parquet"),
                "stats": storage.join(self.shards, f"{name}_stats.json")}  # img2dataset's name

    def embedding_files(self, shard_id: int) -> dict[str, str]:
        return embedding_files(self.embeddings, shard_id)

    def report_samples_file(self, shard_id: int) -> str:
        return storage.join(self.report_samples, f"{shard_name(shard_id)}.parquet")

    def report_download_samples_file(self, shard_id: int) -> str:
        """Thumbnails of the images the download stage dropped after fetching them."""
        return storage.join(self.report_samples, f"{shard_name(shard_id)}.download.parquet")
