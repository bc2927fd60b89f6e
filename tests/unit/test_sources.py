"""Where the write stage's images come from for input tars (pipeline/sources.py): each kept image
normalized from the input tar with the run's resize policy, or rejected as the download stage would."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from curate.pipeline.config import RunConfig
from curate.pipeline.layout import RunLayout
from curate.pipeline.records import FAILED_TO_RESIZE
from curate.pipeline.sources import SPAN_COLUMNS, write_images
from curate.pipeline.stages.read import read_shard
from test_read import image, sample, write_tar


def noisy_jpeg(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


def test_input_images_are_normalized_in_order_or_rejected(tmp_path):
    good = noisy_jpeg(200, 100)  # cut in half below: its header reads, its pixels do not
    write_tar(tmp_path / "in.tar", [*sample("a", img=good), *sample("b", img=good[:len(good) // 2]),
                                    ("c.txt", b"no image"), *sample("d", img=image(50, 80, fmt="PNG"), ext="png")])
    cfg = RunConfig.model_validate({"input": {"paths": [str(tmp_path / "in.tar")]}, "resize": {"size": 64},
                                    "output": {"path": str(tmp_path / "out")}})
    layout = RunLayout(tmp_path / "out")
    read_shard(str(tmp_path / "in.tar"), 0, layout.download, cfg)
    records = pq.read_table(layout.download_files(0)["parquet"]).to_pylist()
    got = list(write_images(cfg, layout, 0, records))

    assert [key for key, *_ in got] == [records[i]["key"] for i in (0, 1, 3)]  # the kept rows, in order
    (_, jpg, meta, none), (_, no_jpg, _, rejection), (_, png_as_jpg, _, _) = got
    assert none is None and Image.open(io.BytesIO(jpg)).size == (128, 64)
    assert (meta["width"], meta["height"], meta["original_width"]) == (128, 64, 200)
    assert (records[0]["width"], records[0]["height"]) == (128, 64)  # the record gets the sizes too
    assert no_jpg is None and (rejection.reason, rejection.status) == ("decode_error", FAILED_TO_RESIZE)
    assert Image.open(io.BytesIO(png_as_jpg)).format == "JPEG"
    assert not any(c in r for r in records for c in SPAN_COLUMNS)  # no output carries them
