"""`curate run` against object storage: a real S3 API server on 127.0.0.1 (moto's standalone
server, tests/s3_server.py), real Dask worker processes, input read from the bucket and the
whole output written to it.

The story: a reference run into s3://curate/ref; a run into s3://curate/out SIGKILLed once some
shards are final, then resumed: its objects equal the reference's byte for byte. Credentials
come from the environment only and appear in no object, log line or report; a missing bucket is
one line and a non-zero exit. The store is an endpoint of the config, not a row URL: the
download guard against private and loopback addresses stays on for rows.
"""

from __future__ import annotations

import hashlib
import io
import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import kill_curate_when, run_curate, write_config
from curate.pipeline.models.clip import TINY_CLIP, TINY_CLIP_DIR
from s3_server import CREDENTIALS, S3Server

# The story's rows: the dataset's first 150, in six shards, every other one slow.
ROWS, ROWS_PER_SHARD = 150, 25
TIMING_KEYS = {"duration_seconds", "rows_per_second", "images_per_second", "task_seconds_by_stage"}


def snapshot(fs, prefix: str) -> dict:
    """What a run left in the bucket: tar bytes, parquet rows, markers, stats counts, and every object's name."""
    names = sorted(fs.find(prefix))
    shards = [n for n in names if n.startswith(f"{prefix}/shards/")]
    stats = json.loads(fs.cat_file(f"{prefix}/stats.json"))
    return {
        "tars": {n.rsplit("/", 1)[1]: hashlib.sha256(fs.cat_file(n)).hexdigest() for n in shards if n.endswith(".tar")},
        "rows": {n.rsplit("/", 1)[1]: pq.read_table(io.BytesIO(fs.cat_file(n))).to_pylist()
                 for n in shards if n.endswith(".parquet")},
        "markers": [n.rsplit("/", 1)[1] for n in shards if n.endswith(".done.json")],
        "stats": {k: v for k, v in stats.items() if k not in TIMING_KEYS},
        "objects": [n[len(prefix) + 1:] for n in names],
    }


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        server.filesystem().mkdir("curate")
        yield server


@pytest.fixture(scope="module")
def story(dataset, s3, tmp_path_factory):
    server, urls, _ = dataset
    fs = s3.filesystem()
    # Every other image behind /slow/0.2/, so that the run can be stopped part-way.
    frame = pd.read_parquet(urls).iloc[:ROWS].copy()
    slow = frame.index % 2 == 0
    plain = f"{server.base_url}/images/"
    frame.loc[slow, "URL"] = frame.loc[slow, "URL"].str.replace(plain, f"{server.base_url}/slow/0.2/images/", regex=False)
    local = tmp_path_factory.mktemp("s3-input") / "urls.parquet"
    frame.to_parquet(local, index=False)
    fs.put_file(str(local), "curate/input/urls.parquet")

    tmp = tmp_path_factory.mktemp("s3-run")
    config = write_config(tmp / "config.yaml", "s3://curate/input/urls.parquet", "s3://curate/out",
                          input={"rows_per_shard": ROWS_PER_SHARD}, download={"threads": 4, "timeout": 10},
                          storage=s3.storage)
    command = ["run", str(config), "--no-progress"]
    story = {"fs": fs}
    # The reference in-process (the executor does not change what is written); the interrupted run on real workers.
    story["ref_result"] = run_curate([*command, "--set", "output.path=s3://curate/ref", "--set", "dask.in_process=true"],
                                     s3.env)
    story["ref"] = snapshot(fs, "curate/ref")

    story["alive_at_kill"], _ = kill_curate_when(
        command, s3.env, lambda: bool(fs.glob("curate/out/shards/*.done.json", refresh=True)), poll=0.05)
    fs.invalidate_cache()
    story["done_at_kill"] = fs.glob("curate/out/shards/*.done.json")
    story["resume_result"] = run_curate(command, s3.env)
    fs.invalidate_cache()
    story["resumed"] = snapshot(fs, "curate/out")
    return story


def test_reference_run_writes_every_output_to_the_bucket(story):
    result, ref = story["ref_result"], story["ref"]
    assert result.returncode == 0, result.stderr[-2000:]
    n = len(ref["markers"])
    assert n == ROWS // ROWS_PER_SHARD
    assert {"config.yaml", "stats.json", "report.html"} <= set(ref["objects"])
    assert len(ref["tars"]) == n and len(ref["rows"]) == n
    stats = ref["stats"]
    assert stats["rows_in"] == ROWS == stats["written"] + stats["rejected"] > stats["written"] > 0
    assert sum(len(rows) for rows in ref["rows"].values()) == ROWS
    assert "s3://curate/ref" in result.stdout


def test_killed_run_resumes_to_the_same_bytes(story):
    assert story["alive_at_kill"], "the run finished before it could be interrupted"
    assert 0 < len(story["done_at_kill"]) < ROWS // ROWS_PER_SHARD
    result = story["resume_result"]
    assert result.returncode == 0, result.stderr[-2000:]
    ref, resumed = story["ref"], story["resumed"]
    assert resumed["tars"] == ref["tars"]
    assert resumed["rows"] == ref["rows"]
    assert resumed["stats"] == ref["stats"]
    assert resumed["objects"] == ref["objects"]  # nothing half-written left behind either


def test_no_credential_is_written_or_printed(story):
    fs = story["fs"]
    secrets = [CREDENTIALS["AWS_ACCESS_KEY_ID"], CREDENTIALS["AWS_SECRET_ACCESS_KEY"]]
    texts = [fs.cat_file(f"curate/ref/{name}").decode("utf-8", "replace")
             for name in ("config.yaml", "stats.json", "report.html")]
    texts += [story["ref_result"].stdout, story["ref_result"].stderr,
              story["resume_result"].stdout, story["resume_result"].stderr]
    for text in texts:
        for secret in secrets:
            assert secret not in text


def test_the_row_guard_stays_on_with_a_loopback_store(dataset, s3, tmp_path):
    """The store is on 127.0.0.1 and reached; rows pointing at 127.0.0.1 are still refused."""
    server, urls, _ = dataset
    fs = s3.filesystem()
    config = write_config(tmp_path / "config.yaml", urls, "s3://curate/guarded", input={"rows_per_shard": 100},
                          storage=s3.storage, dask={"in_process": True}, download={"timeout": 3})
    raw = config.read_text().replace("allow_private_addresses: true", "allow_private_addresses: false")
    config.write_text(raw)
    before = server.requests
    result = run_curate(["run", str(config), "--no-progress"], s3.env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert server.requests == before  # not one row was fetched
    stats = json.loads(fs.cat_file("curate/guarded/stats.json"))
    assert stats["rows_in"] == 300 and stats["written"] == 0
    assert all("address" in reason for reason in stats["rejected_by_reason"]), stats["rejected_by_reason"]


def test_a_missing_bucket_is_one_line_and_nothing_is_written(dataset, s3, tmp_path):
    _, urls, _ = dataset
    config = write_config(tmp_path / "config.yaml", urls, "s3://no-such-bucket/run", storage=s3.storage,
                          dask={"in_process": True})
    result = run_curate(["run", str(config), "--no-progress"], s3.env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "s3://no-such-bucket/run" in lines[0] and "no such bucket" in lines[0], result.stderr
    assert "no-such-bucket" not in s3.filesystem().ls("", refresh=True)


def test_credentials_in_the_config_are_refused(dataset, s3, tmp_path):
    _, urls, _ = dataset
    config = write_config(tmp_path / "config.yaml", urls, "s3://curate/secret",
                          storage={"s3": {"endpoint_url": s3.endpoint, "secret": "x", "key": "y"}})
    result = run_curate(["run", str(config), "--no-progress"], s3.env)
    assert result.returncode != 0
    assert "credentials do not belong in the config" in result.stderr and result.stderr.count("\n") == 1
    assert not s3.filesystem().exists("curate/secret")


@pytest.mark.skipif(not (TINY_CLIP_DIR / "open_clip_config.json").exists(), reason="tiny CLIP not built")
def test_scored_and_deduplicated_run_in_the_bucket_equals_the_local_one(dataset, s3, tmp_path):
    """Every stage and pass through object storage: scores and embeddings, the dedup pass's
    work files, the written shards: the same bytes as the same run into a local folder."""
    _, urls, _ = dataset
    fs = s3.filesystem()
    urls_subset = tmp_path / "urls.parquet"  # 150 rows are enough to cross every stage twice
    pd.read_parquet(urls).head(150).to_parquet(urls_subset, index=False)
    urls = urls_subset
    sections = dict(input={"rows_per_shard": 75}, storage=s3.storage, dask={"in_process": True},
                    clip={"enabled": True, "model": TINY_CLIP, "pretrained": None, "device": "cpu", "batch_size": 64},
                    filters=[{"name": "dedup", "phash_max_distance": 4, "semantic_eps": 0.05}])
    for output in ("s3://curate/scored", tmp_path / "local"):
        config = write_config(tmp_path / "config.yaml", urls, output, **sections)
        result = run_curate(["run", str(config), "--no-progress"], s3.env)
        assert result.returncode == 0, result.stderr[-2000:]
    remote = snapshot(fs, "curate/scored")
    local = tmp_path / "local"
    assert remote["tars"] == {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                              for p in sorted((local / "shards").glob("*.tar"))}
    assert remote["rows"] == {p.name: pq.read_table(p).to_pylist() for p in sorted((local / "shards").glob("*.parquet"))}
    assert remote["stats"]["filters"]["dedup"] == json.loads((local / "stats.json").read_text())["filters"]["dedup"]
    assert any(name.startswith("embeddings/img_emb/") for name in remote["objects"])
    assert "work/dedup/done.json" in remote["objects"]


def test_refused_credentials_are_one_line_and_nothing_is_written(dataset, tmp_path):
    """A store that checks credentials (tests/s3_server.py auth=True) and an environment whose key it does not know."""
    _, urls, _ = dataset
    with S3Server(auth=True) as store:
        store.filesystem().mkdir("curate-auth")
        config = write_config(tmp_path / "config.yaml", urls, "s3://curate-auth/run", storage=store.storage,
                              dask={"in_process": True})
        wrong = dict(store.env, AWS_ACCESS_KEY_ID="AKIAWRONGWRONGWRONG1", AWS_SECRET_ACCESS_KEY="wrong-secret")
        result = run_curate(["run", str(config), "--no-progress"], wrong)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "s3://curate-auth/run" in lines[0] and "access denied" in lines[0], result.stderr
        assert "wrong-secret" not in result.stderr
        assert store.filesystem().ls("curate-auth", refresh=True) == []  # the right key sees nothing written
