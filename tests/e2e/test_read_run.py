"""`curate run` over existing shards: two input tars scored with the tiny CLIP, filtered and
written one to one, resumed and rerun byte-identical; and img2dataset's own output (made by
img2dataset against the loopback test server) as input."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from curate.pipeline.config import load_config
from curate.pipeline.demo.synthetic import caption, generate_dataset, random_scene, render, wrong_caption
from curate.pipeline.models.clip import TINY_CLIP, TINY_CLIP_DIR
from curate.pipeline.run import run
from curate.pipeline.tarshard import iter_tar_samples

SAMPLES = 24  # per input tar


def _add(tar: tarfile.TarFile, name: str, data: bytes | None) -> None:
    info = tarfile.TarInfo(name)
    if data is None:
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        return
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def input_tar(path: Path, seed: int) -> dict[str, str]:
    """A WebDataset tar as published datasets look (jpg/png, txt, json with LAION's columns);
    every 4th caption is wrong, and a few samples are bad on purpose. Returns key → truth."""
    rng = random.Random(seed)
    truth = {}
    previous = (b"", "")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        _add(tar, "images", None)  # a directory member: counted, not a sample
        for i in range(SAMPLES):
            key = f"s{seed}-{i:03d}"
            scene = random_scene(rng)
            kind = {5: "unsafe", 7: "too_small", 9: "corrupt", 11: "png", 13: "no_image", 17: "duplicate",
                    19: "no_json"}.get(i, "ok")
            kind = "wrong_caption" if kind == "ok" and i % 4 == 3 else kind
            side = (40, 40) if kind == "too_small" else (rng.randint(96, 160), rng.randint(96, 160))
            buf = io.BytesIO()
            render(scene, *side, rng).save(buf, "PNG" if kind == "png" else "JPEG", quality=90)
            data = buf.getvalue()[:len(buf.getvalue()) // 2] if kind == "corrupt" else buf.getvalue()  # its header reads, its pixels don't
            text = wrong_caption(scene, rng) if kind == "wrong_caption" else caption(scene)
            if kind == "duplicate":  # the previous sample's image and caption again
                data, text = previous
            previous = data, text
            if kind != "no_image":
                _add(tar, f"{key}.{'png' if kind == 'png' else 'jpg'}", data)
            _add(tar, f"{key}.txt", text.encode())
            if kind != "no_json":
                _add(tar, f"{key}.json", json.dumps({"url": f"https://example.com/{key}", "similarity": 0.3,
                                                     "punsafe": 0.8 if kind == "unsafe" else 0.02}).encode())
            truth[key] = kind
    return truth


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*")) if p.suffix in (".tar", ".parquet")}


@pytest.mark.skipif(not (TINY_CLIP_DIR / "open_clip_config.json").exists(), reason="tiny CLIP not built")
def test_input_tars_are_read_scored_and_written_one_to_one(tmp_path):
    truth = {**input_tar(tmp_path / "in" / "part-0.tar", 0), **input_tar(tmp_path / "in" / "part-1.tar", 1)}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"paths": [str(tmp_path / "in" / "part-{0..1}.tar")]},
        "output": {"path": str(tmp_path / "out"), "keep_intermediate": True},
        "resize": {"size": 64},
        "clip": {"enabled": True, "model": TINY_CLIP, "pretrained": None, "batch_size": 16, "reader_processes": 0},
        "dask": {"in_process": True},
        "filters": [{"name": "laion_columns"}, {"name": "resolution", "min_side": 64},
                    {"name": "clip_similarity", "min_similarity": 0.5}, {"name": "dedup"}],
    }))
    cfg = load_config(config)
    assert cfg.input.format == "webdataset"
    out = tmp_path / "out"
    stats = run(cfg, progress=False)

    rows = [r for p in sorted((out / "shards").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert stats["rows_in"] == len(truth) == len(rows) == stats["written"] + stats["rejected"]
    assert stats["shards"] == 2 and stats["input"]["tars"] == 2
    assert stats["input"]["members_ignored"] == {"directory": 2}
    assert "read from the input tars" in (out / "report.html").read_text()  # the report's funnel: no download step
    reason = {r["source_key"]: r["reason"] for r in rows}
    expected = {"unsafe": "unsafe: laion_punsafe>=0.5", "too_small": "resolution: side<64", "corrupt": "decode_error",
                "no_image": "no_image", "ok": None, "png": None, "no_json": None, "duplicate": "duplicate: sha256"}
    for key, kind in truth.items():
        if kind == "wrong_caption":
            continue
        assert reason[key] == expected[kind], (key, kind)
    wrong = [reason[k] for k, kind in truth.items() if kind == "wrong_caption"]
    assert sum(r == "clip_similarity<0.5" for r in wrong) >= len(wrong) - 1

    # One input tar → one output shard; keys by position, the input's own key and tar beside them.
    by_key = {r["key"]: r for r in rows}
    for shard in (0, 1):
        for key, fields in iter_tar_samples(out / "shards" / f"{shard:05d}.tar"):
            meta = json.loads(fields["json"])
            assert key.startswith(f"{shard:05d}") and by_key[key]["status"] == "success"
            assert meta["source_shard"] == str(tmp_path / "in" / f"part-{shard}.tar")
            assert meta["source_key"].startswith(f"s{shard}-") and meta.get("similarity") in (0.3, None)
            assert min(Image.open(io.BytesIO(fields["jpg"])).size) == 64  # normalized by the write stage
            assert fields["txt"].decode() == by_key[key]["caption"]
    # Nothing of the input was copied: the read stage wrote parquets and markers only.
    assert sorted({p.suffix for p in (out / "work" / "download").iterdir()}) == [".json", ".parquet"]
    embedded = sum(np.load(p).shape[0] for p in (out / "embeddings" / "img_emb").glob("*.npy"))
    # (dedup's pHash decodes each image in the read stage: the corrupt ones end there, before scoring)
    assert embedded == sum(1 for k in truth if truth[k] not in ("unsafe", "too_small", "no_image", "corrupt"))

    # Resume: shard 1 as a run killed while writing it left it (no marker); only it is redone.
    first = shard_bytes(out)
    for leftover in (out / "shards").glob("00001*"):
        leftover.unlink()
    again = run(load_config(config), progress=False)
    assert shard_bytes(out) == first and again["rows_in"] == stats["rows_in"]
    assert again["rejected_by_reason"] == stats["rejected_by_reason"]
    # --overwrite starts afresh, to the same bytes.
    run(load_config(config), overwrite=True, progress=False)
    assert shard_bytes(out) == first


@pytest.mark.img2dataset
def test_img2dataset_output_is_curate_input(tmp_path, server):
    """img2dataset fetches from the loopback server; its shards go to `curate run` as they are."""
    pytest.importorskip("img2dataset")
    urls = generate_dataset(server.root_dir, 30, base_url=server.base_url, seed=5, min_side=96, max_side=160)
    table = pq.read_table(urls).to_pandas()
    table["punsafe"] = [0.9 if i % 6 == 0 else 0.1 for i in range(len(table))]
    table.to_parquet(tmp_path / "urls.parquet")
    made = tmp_path / "i2d"
    code = (f"from img2dataset import download; download(url_list={str(tmp_path / 'urls.parquet')!r}, "
            "input_format='parquet', url_col='URL', caption_col='TEXT', save_additional_columns=['punsafe'], "
            f"output_folder={str(made)!r}, output_format='webdataset', processes_count=1, thread_count=8, "
            "number_sample_per_shard=16, image_size=64, timeout=3, retries=0, enable_wandb=False)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    successes = sum(json.loads(p.read_text())["successes"] for p in made.glob("*_stats.json"))
    expected = {}  # img2dataset's key → (caption, punsafe) of what it wrote
    for tar_path in sorted(made.glob("*.tar")):
        for key, fields in iter_tar_samples(tar_path):
            expected[key] = (fields["txt"].decode(), json.loads(fields["json"])["punsafe"])
    assert len(expected) == successes > 0

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"input": {"paths": [f"{made}/*.tar"]}, "output": {"path": str(tmp_path / "out")},
                                      "resize": {"size": 64}, "dask": {"in_process": True},
                                      "filters": [{"name": "laion_columns"}]}))
    stats = run(load_config(config), progress=False)
    rows = [r for p in sorted((tmp_path / "out" / "shards").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert stats["rows_in"] == successes == stats["written"] + stats["rejected"]
    assert "crosscheck_mismatches" not in stats["input"]  # img2dataset's parquet and stats agree with its tars
    assert {r["source_key"]: (r["caption"], r["punsafe"]) for r in rows} == expected
    dropped = {k for k, (_, punsafe) in expected.items() if punsafe >= 0.5}
    assert {r["source_key"] for r in rows if r["reason"] == "unsafe: laion_punsafe>=0.5"} == dropped
    assert stats["written"] == successes - len(dropped)


def test_input_tars_in_object_storage(tmp_path):
    """Tars read from a real S3 API server (moto's, on 127.0.0.1), brace-expanded; the run written back to it."""
    pytest.importorskip("s3fs")
    from conftest import run_curate
    from s3_server import S3Server

    truth = input_tar(tmp_path / "00000.tar", 0)
    with S3Server() as s3:
        fs = s3.filesystem()
        fs.mkdir("pool")
        fs.put_file(str(tmp_path / "00000.tar"), "pool/in/00000.tar")
        fs.pipe_file("pool/in/00001.tar", b"an object that is no tar")
        run_config = {"input": {"paths": ["s3://pool/in/{00000..00000}.tar"]}, "output": {"path": "s3://pool/out"},
                      "storage": s3.storage, "resize": {"size": 64}, "dask": {"in_process": True}}
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_config))
        done = run_curate(["run", str(tmp_path / "run.yaml"), "--no-progress"], s3.env)
        assert done.returncode == 0, done.stderr[-2000:]
        stats = json.loads(fs.cat_file("pool/out/stats.json"))
        assert stats["rows_in"] == len(truth) == stats["written"] + stats["rejected"]
        assert {n.rsplit("/", 1)[1] for n in fs.find("pool/out/shards")} >= {"00000.tar", "00000.parquet", "00000.done.json"}
        assert not [n for n in fs.find("pool/out/work") if n.endswith(".tar")]  # nothing of the input copied

        run_config["input"]["paths"] = ["s3://pool/in/*.tar"]
        run_config["output"]["path"] = "s3://pool/refused"
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_config))
        refused = run_curate(["run", str(tmp_path / "run.yaml"), "--no-progress"], s3.env)
        assert refused.returncode == 2
        assert refused.stderr.strip() == "curate: error: input s3://pool/in/00001.tar: not a tar file"
        assert not fs.find("pool/refused")
