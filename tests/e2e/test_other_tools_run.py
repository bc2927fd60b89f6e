"""curate's output read by the code paths other tools use, unchanged: webdataset's decoder, Hugging
Face `datasets`' webdataset builder, a clip-retrieval-style WebdatasetReader, img2dataset-style
consumers of `NNNNN_stats.json` and the shard parquet, and an index over the embeddings in
clip-retrieval's layout. One small run (tiny CLIP, in process) serves every test."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from conftest import run_curate, write_config
from curate.pipeline.models.clip import TINY_CLIP, TINY_CLIP_DIR
from curate.pipeline.records import FAILED_TO_DOWNLOAD, FAILED_TO_RESIZE, FILTERED, STATUSES, SUCCESS
from curate.pipeline.shards import sample_key

pytestmark = pytest.mark.skipif(not (TINY_CLIP_DIR / "open_clip_config.json").exists(), reason="tiny CLIP not built")

ROWS_PER_SHARD = 160  # 302 rows in one file: two shards, keys with 3 index digits
MIN_SIMILARITY = 0.5  # the write stage drops the mismatched captions: embedded, not written
# The fields img2dataset puts in every sample's json and parquet row (its downloader's `meta`).
IMG2DATASET_FIELDS = ("key", "status", "error_message", "width", "height", "original_width", "original_height",
                      "url", "caption", "sha256")
# And in every NNNNN_stats.json (its logger.write_stats).
IMG2DATASET_STATS = ("count", "successes", "failed_to_download", "failed_to_resize", "duration", "start_time",
                     "end_time", "status_dict")


@pytest.fixture(scope="module")
def out(dataset, tmp_path_factory) -> Path:
    """The served dataset plus two images that do not decode, so that every status occurs."""
    server, urls, root = dataset
    tmp = tmp_path_factory.mktemp("other-tools")
    for i in range(2):
        (root / "images" / f"not-an-image-{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(3000))
    broken = pd.DataFrame({"URL": [f"{server.base_url}/images/not-an-image-{i}.jpg" for i in range(2)],
                           "TEXT": ["a red circle on a blue background"] * 2, "WIDTH": [200] * 2,
                           "HEIGHT": [200] * 2, "truth": ["not_an_image"] * 2})
    # One file (a shard never spans files): the broken rows share the last shard with good ones.
    pd.concat([pd.read_parquet(urls), broken], ignore_index=True).to_parquet(tmp / "urls.parquet", index=False)
    config = write_config(
        tmp / "run.yaml", tmp / "urls.parquet", tmp / "out",
        input={"rows_per_shard": ROWS_PER_SHARD},
        download={"timeout": 10}, dask={"in_process": True},
        clip={"enabled": True, "model": TINY_CLIP, "pretrained": None, "device": "cpu", "batch_size": 64},
        filters=[{"name": "clip_similarity", "min_similarity": MIN_SIMILARITY}],
    )
    env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
    result = run_curate(["run", str(config), "--no-progress"], env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "out"


def tars(out: Path) -> list[str]:
    return [str(p) for p in sorted((out / "shards").glob("*.tar"))]


def shard_rows(out: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted((out / "shards").glob("*.parquet"))], ignore_index=True)


def written_keys(out: Path) -> list[str]:
    rows = shard_rows(out)
    return sorted(rows.loc[rows["status"] == SUCCESS, "key"])


def test_every_status_occurs_and_only_those(out):
    rows = shard_rows(out)
    assert set(rows["status"]) == set(STATUSES)
    assert rows.loc[rows["truth"] == "not_an_image", "status"].eq(FAILED_TO_RESIZE).all()
    assert rows.loc[rows["truth"] == "broken_url", "status"].eq(FAILED_TO_DOWNLOAD).all()
    clip = rows["reject_filter"] == "clip_similarity"
    assert clip.any() and rows.loc[clip, "status"].eq(FILTERED).all()


def test_webdataset_decodes_every_sample(out):
    rows = shard_rows(out).set_index("key")
    pipeline = wds.WebDataset(tars(out), shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt", "json")
    keys = []
    for key, image, text, meta in pipeline:
        keys.append(key)
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert image.size == (meta["width"], meta["height"])
        assert text == meta["caption"] == rows.loc[key, "caption"]
        assert set(IMG2DATASET_FIELDS) <= set(meta), key
        assert (meta["key"], meta["status"], meta["error_message"]) == (key, SUCCESS, None)
        assert meta["url"] == rows.loc[key, "url"] and meta["sha256"] == rows.loc[key, "sha256"]
    assert sorted(keys) == written_keys(out) and len(keys) > 100


def test_hugging_face_datasets_webdataset_builder_loads_the_shards(out, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from datasets import load_dataset

    ds = load_dataset("webdataset", data_files={"train": tars(out)}, split="train", cache_dir=str(tmp_path / "hf"))
    assert {"__key__", "jpg", "txt", "json"} <= set(ds.column_names)
    assert sorted(ds["__key__"]) == written_keys(out)
    first = ds[0]
    assert isinstance(first["jpg"], Image.Image) and first["jpg"].size == (first["json"]["width"], first["json"]["height"])
    assert first["txt"] == first["json"]["caption"] and first["json"]["status"] == SUCCESS
    assert first["json"]["key"] == first["__key__"]


def create_webdataset(urls, image_transform, tokenizer, image_key="jpg", caption_key="txt"):
    """clip-retrieval's clip_inference `create_webdataset` (reader.py) with text and metadata on:
    the pipeline its WebdatasetReader feeds to a DataLoader."""
    dataset = wds.WebDataset(urls, cache_dir=None, cache_size=10**10, handler=wds.handlers.warn_and_continue)

    def filter_dataset(item):
        return caption_key in item and image_key in item and "json" in item

    def preprocess_dataset(item):
        caption = item[caption_key].decode("utf-8")
        return {
            "image_filename": item["__key__"],
            "image_tensor": image_transform(Image.open(io.BytesIO(item[image_key]))),
            "text_tokens": tokenizer([caption])[0],
            "text": caption,
            "metadata": item["json"].decode("utf-8"),
        }

    return dataset.select(filter_dataset).map(preprocess_dataset, handler=wds.handlers.warn_and_continue)


@pytest.mark.filterwarnings("ignore:WebDataset.shardshuffle")  # clip-retrieval leaves it unset
def test_clip_retrieval_webdataset_reader_reads_every_sample(out):
    import open_clip
    import torchvision.transforms as T
    from torch.utils.data import DataLoader

    transform = T.Compose([T.Resize(64), T.CenterCrop(64), T.ToTensor()])
    loader = DataLoader(create_webdataset(tars(out), transform, open_clip.tokenize), batch_size=32,
                        shuffle=False, num_workers=0)
    names, captions, metadata = [], [], []
    for batch in loader:
        assert tuple(batch["image_tensor"].shape[1:]) == (3, 64, 64) and batch["text_tokens"].shape[1] == 77
        names += batch["image_filename"]
        captions += batch["text"]
        metadata += batch["metadata"]
    # What its OutputSink writes as metadata_N.parquet: image_path, caption, then the json's fields.
    frame = pd.DataFrame({"image_path": names, "caption": captions})
    parsed = pd.json_normalize([json.loads(m) for m in metadata])
    frame = frame.join(parsed.drop(columns=["caption"]))
    assert sorted(frame["image_path"]) == written_keys(out)
    assert (frame["image_path"] == frame["key"]).all() and frame["status"].eq(SUCCESS).all()
    assert frame["url"].str.startswith("http://127.0.0.1").all()


def test_img2dataset_stats_and_parquet_read_as_its_consumers_read_them(out):
    shards = out / "shards"
    stats_files = sorted(shards.glob("*_stats.json"))
    assert [p.name for p in stats_files] == ["00000_stats.json", "00001_stats.json"]
    totals = {"count": 0, "successes": 0}
    for path in stats_files:
        name = path.name.split("_")[0]  # how img2dataset's logger finds the shard id
        stats = json.loads(path.read_text())
        assert set(IMG2DATASET_STATS) <= set(stats) and "rejected_by_reason" in stats
        rows = pd.read_parquet(shards / f"{name}.parquet")
        assert set(IMG2DATASET_FIELDS) <= set(rows.columns)
        assert stats["count"] == len(rows)
        for field, status in (("successes", SUCCESS), ("failed_to_download", FAILED_TO_DOWNLOAD),
                              ("failed_to_resize", FAILED_TO_RESIZE), ("filtered", FILTERED)):
            assert stats[field] == (rows["status"] == status).sum(), field
        assert stats["count"] == stats["successes"] + stats["failed_to_download"] + stats["failed_to_resize"] + stats["filtered"]
        assert sum(stats["status_dict"].values()) == stats["count"]
        assert stats["status_dict"] == {SUCCESS: stats["successes"], **stats["rejected_by_reason"]}
        assert stats["rejected_by_reason"] == rows.loc[rows["status"] != SUCCESS, "reason"].value_counts().to_dict()
        assert stats["start_time"] <= stats["end_time"] and stats["duration"] == pytest.approx(
            stats["end_time"] - stats["start_time"])
        assert path.stat().st_mtime_ns <= (shards / f"{name}.done.json").stat().st_mtime_ns  # the marker comes last
        # img2dataset's row semantics: sizes for successes, an error message for failures.
        ok = rows["status"] == SUCCESS
        assert rows.loc[ok, ["width", "height", "original_width", "original_height", "sha256"]].notna().all().all()
        assert rows.loc[ok, "error_message"].isna().all()
        failed = rows["status"].isin([FAILED_TO_DOWNLOAD, FAILED_TO_RESIZE])
        assert rows.loc[failed, "error_message"].notna().all() and rows.loc[failed, "width"].isna().all()
        # Keys as img2dataset's compute_key forms them: shard id, then the row in ceil(log10(rows a shard)) digits.
        digits = math.ceil(math.log10(ROWS_PER_SHARD))
        shard = int(name)
        assert list(rows["key"]) == [f"{(10 ** digits) * shard + i:0{5 + digits}d}" for i in range(len(rows))]
        assert list(rows["key"]) == [sample_key(shard, i, ROWS_PER_SHARD) for i in range(len(rows))]
        totals["count"] += stats["count"]
        totals["successes"] += stats["successes"]
    run = json.loads((out / "stats.json").read_text())
    assert (totals["count"], totals["successes"]) == (run["rows_in"], run["written"]) == (302, len(written_keys(out)))


def test_embeddings_line_up_with_what_was_written(out):
    """An index over img_emb/ numbers its vectors in file order (autofaiss, clip-retrieval's
    clip_index), and finds each one's url and caption in the metadata row of that number."""
    emb = out / "embeddings"
    parts = {part: sorted((emb / part).iterdir()) for part in ("img_emb", "text_emb", "metadata")}
    numbers = {part: [p.stem.removeprefix(f"{part}_") for p in files] for part, files in parts.items()}
    assert numbers["img_emb"] == numbers["text_emb"] == numbers["metadata"] == ["00000", "00001"]
    meta = pd.concat([pd.read_parquet(p) for p in parts["metadata"]], ignore_index=True)
    img = np.concatenate([np.load(p) for p in parts["img_emb"]]).astype(np.float32)
    txt = np.concatenate([np.load(p) for p in parts["text_emb"]]).astype(np.float32)
    assert len(img) == len(txt) == len(meta)
    assert list(meta.columns[:3]) == ["key", "url", "caption"] and meta["written"].dtype == bool
    # Row i of the index is the sample of metadata row i: its similarity is the product of the two rows.
    embedded = meta["status"] == SUCCESS
    assert np.abs((img * txt).sum(1)[embedded] - meta.loc[embedded, "clip_similarity"]).max() < 5e-3
    # Each row's url, caption and `written` are the shard parquet's.
    rows = shard_rows(out).set_index("key").loc[meta["key"]]
    assert list(meta["url"]) == list(rows["url"]) and list(meta["caption"]) == list(rows["caption"])
    assert list(meta["written"]) == list(rows["status"] == SUCCESS)
    # Every written sample has its row, and the rows not written were dropped by the write stage.
    assert sorted(meta.loc[meta["written"], "key"]) == written_keys(out)
    assert (~meta["written"]).any() and rows.loc[~meta["written"].to_numpy(), "status"].eq(FILTERED).all()
