"""Safety filters through `curate run`: two runs of the same config on the same served rows
(the tiny CLIP, a trained NSFW head, the concept filter), the second with a hash blocklist;
reasons and scores recorded, exactly the listed images removed, and a blocked image in no
file of the run. The scenes and calibration are tests/safety_scenes.py's."""

from __future__ import annotations

import hashlib
import json
import os
import random
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import run_curate, write_config
from curate.pipeline.models.clip import TINY_CLIP, TINY_CLIP_DIR
from curate.pipeline.demo.devserver import DevServer
from curate.pipeline.image import normalize_image
from curate.pipeline.records import SUCCESS
from curate.pipeline.demo.synthetic import caption
from safety_scenes import NSFW_CONCEPT, RESIZE, ZERO_SHOT_CONCEPT, concept_spec, labelled_scenes, rendered
from safety_scenes import concept_threshold, data, nsfw_weights  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(not (TINY_CLIP_DIR / "open_clip_config.json").exists(), reason="tiny CLIP not built")


def rows_of(out: Path) -> pd.DataFrame:
    return pd.concat([pq.read_table(p).to_pandas() for p in sorted((out / "shards").glob("*.parquet"))],
                     ignore_index=True).set_index("key")


def tar_members(out: Path) -> dict[str, bytes]:
    members = {}
    for path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                members[m.name] = tar.extractfile(m).read()
    return members


def files_holding(root: Path, needle: bytes) -> list[Path]:
    """Every file under root whose bytes contain `needle`, also inside parquet cells (a
    parquet file compresses its pages, so its raw bytes would not show an image it holds)."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if needle in path.read_bytes():
            found.append(path)
        elif path.suffix == ".parquet":
            table = pq.read_table(path)
            for column in table.columns:
                if any(isinstance(v, bytes) and needle in v for v in column.to_pylist()):
                    found.append(path)
                    break
    return found


@pytest.fixture(scope="module")
def e2e(dataset, concept_threshold, nsfw_weights, tmp_path_factory):
    """Two runs of the same config on the same served rows, with the tiny CLIP, the NSFW
    head and the concept filter, keeping every intermediate file; the second also has a
    hash blocklist listing the sha256 of one served image and the md5 of another."""
    _, urls, data_dir = dataset
    tmp = tmp_path_factory.mktemp("safety-run")
    # Rows: 100 of the shared dataset (with its planted faults) and 40 scenes of our own,
    # a quarter of each concept, served from a second server.
    www = tmp / "www"
    (www / "images").mkdir(parents=True)
    rng = random.Random(77)
    ours = []
    with DevServer(www) as own:
        for i, (scene, label) in enumerate(labelled_scenes(13, per_concept=10, others=20)):
            (www / "images" / f"c{i:03d}.jpg").write_bytes(rendered(scene, rng))
            ours.append({"URL": f"{own.base_url}/images/c{i:03d}.jpg", "TEXT": caption(scene), "truth": label})
        inputs = pd.concat([pd.read_parquet(urls).iloc[:100][["URL", "TEXT", "truth"]], pd.DataFrame(ours)],
                           ignore_index=True)
        inputs.to_parquet(tmp / "urls.parquet", index=False)

        # The blocked images: rows the shared dataset serves fine, one small enough to be
        # stored byte for byte (short side <= 128) and one that is resized.
        full = pd.read_parquet(urls).iloc[:100]
        fine = full[full["truth"] == "ok"]
        small = fine[fine[["WIDTH", "HEIGHT"]].min(axis=1) <= 128].iloc[0]
        large = fine[fine[["WIDTH", "HEIGHT"]].min(axis=1) > 160].iloc[0]
        blocked = {}
        for row in (small, large):
            raw = (data_dir / "images" / row["URL"].rsplit("/", 1)[1]).read_bytes()
            blocked[row["URL"]] = {"original": raw, "normalized": normalize_image(raw, RESIZE).data}
        small_raw, large_raw = blocked[small["URL"]]["original"], blocked[large["URL"]]["original"]
        assert blocked[small["URL"]]["normalized"] == small_raw != blocked[large["URL"]]["normalized"]
        (tmp / "blocked.txt").write_text(
            "# sha256 of one image\n" + hashlib.sha256(small_raw).hexdigest() + "\n")
        (tmp / "blocked-md5.txt").write_text(hashlib.md5(large_raw).hexdigest().upper() + "  image.jpg\n")

        safety = [
            {"name": "nsfw", "weights": str(nsfw_weights), "threshold": 0.5},
            {"name": "concepts", "concepts": [concept_spec(concept_threshold)]},
        ]
        hashes = {"name": "hash_blocklist", "paths": [str(tmp / "blocked.txt"), str(tmp / "blocked-md5.txt")]}
        for name, chain in (("plain", safety), ("blocklist", [hashes, *safety])):
            config = write_config(
                tmp / f"{name}.yaml", tmp / "urls.parquet", tmp / name,
                input={"rows_per_shard": 70},
                download={"timeout": 10},
                clip={"enabled": True, "model": TINY_CLIP, "pretrained": None, "batch_size": 64},
                filters=chain,
                # The filters' decisions are what is checked here, not where they run: in this
                # process, so that the tiny CLIP is imported and loaded once per run rather than in
                # every worker (tests/e2e/test_dedup_run.py and test_report_run.py score on workers).
                dask={"in_process": True},
            )
            env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
            result = run_curate(["run", str(config), "--no-progress", "--set", "output.keep_intermediate=true"],
                                env, timeout=240)
            assert result.returncode == 0, result.stderr[-3000:]
    return {"plain": tmp / "plain", "blocklist": tmp / "blocklist", "blocked": blocked,
            "concept_threshold": concept_threshold}


def test_run_records_safety_reasons_and_scores(e2e):
    out = e2e["plain"]
    rows = rows_of(out)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows_in"] == len(rows) == 140 == stats["written"] + stats["rejected"]
    ours = rows[rows["url"].str.contains("/images/c")]  # our 40 scenes, of known concepts
    nsfw_reason, concept_reason = "unsafe: nsfw punsafe>=0.5", f"unsafe: concept {ZERO_SHOT_CONCEPT}"
    reasons = ours.groupby("truth")["reason"]
    # The head (first in the chain) was trained on one concept, the concept filter looks for
    # the other. (Their rates are measured above on 400 scenes; here 10 of each go through a run.)
    assert (reasons.get_group(NSFW_CONCEPT) == nsfw_reason).mean() >= 0.8
    assert (reasons.get_group(ZERO_SHOT_CONCEPT) == concept_reason).mean() >= 0.8
    assert reasons.get_group("other").isna().mean() >= 0.9
    # Scores land in the parquet for every sample a filter saw, dropped ones too ...
    assert ours["punsafe"].notna().all()
    assert (ours["punsafe"] >= 0.5).eq(ours["reason"] == nsfw_reason).all()
    score = ours[f"concept_{ZERO_SHOT_CONCEPT}"]
    assert score[ours["reason"] != nsfw_reason].notna().all()  # the first drop wins: later filters do not run
    assert (score >= e2e["concept_threshold"]).eq(ours["reason"] == concept_reason).all()
    # ... and in the json of every written sample.
    members = tar_members(out)
    for key in rows.index[rows["status"] == SUCCESS]:
        meta = json.loads(members[f"{key}.json"])
        assert 0 <= meta["punsafe"] < 0.5 and meta[f"concept_{ZERO_SHOT_CONCEPT}"] < e2e["concept_threshold"]
    # Rows dropped for safety have no image in the shards; the filters' counts chain up.
    unsafe = rows.index[rows["reason"].fillna("").str.startswith("unsafe:")]
    assert len(unsafe) >= 18 and not any(f"{k}.jpg" in members for k in unsafe)
    nsfw, concepts = stats["filters"]["nsfw"], stats["filters"]["concepts"]
    assert nsfw["kept"] == sum(concepts.values()) and concepts["kept"] == stats["written"]
    assert nsfw[f"dropped: {nsfw_reason}"] == stats["rejected_by_reason"][nsfw_reason]


def test_hash_blocklist_removes_exactly_the_listed_images_end_to_end(e2e):
    plain, blocked_run = rows_of(e2e["plain"]), rows_of(e2e["blocklist"])
    listed = blocked_run["url"].isin(list(e2e["blocked"]))
    assert listed.sum() == 2
    # The listed rows: rejected for the hash, with their digest; before the run they were written.
    assert (blocked_run.loc[listed, "reason"] == "unsafe: hash_blocklist").all()
    assert (plain.loc[blocked_run.index[listed], "status"] == SUCCESS).all()
    assert blocked_run.loc[listed, "sha256"].notna().all() and blocked_run.loc[listed, "width"].isna().all()
    # Nothing else changed: every other row has the same status, reason and scores (within
    # float noise: the score stage's batches hold two images fewer).
    others = blocked_run.index[~listed]
    same = ["url", "caption", "status", "reason", "sha256", "width", "height", "punsafe", "clip_similarity"]
    pd.testing.assert_frame_equal(plain.loc[others, same], blocked_run.loc[others, same], check_exact=False, atol=2e-3)
    plain_members, blocked_members = tar_members(e2e["plain"]), tar_members(e2e["blocklist"])
    gone = {f"{k}.{ext}" for k in blocked_run.index[listed] for ext in ("jpg", "txt", "json")}
    assert set(plain_members) - set(blocked_members) == gone
    for name, data in blocked_members.items():
        if name.endswith(".json"):
            a, b = json.loads(data), json.loads(plain_members[name])
            assert a.keys() == b.keys() and all(
                a[k] == pytest.approx(b[k], abs=2e-3) if isinstance(a[k], float) else a[k] == b[k] for k in a), name
        else:
            assert data == plain_members[name], name
    stats = json.loads((e2e["blocklist"] / "stats.json").read_text())
    assert stats["rejected_by_reason"]["unsafe: hash_blocklist"] == 2
    assert stats["filters"]["hash_blocklist"]["dropped: unsafe: hash_blocklist"] == 2


def test_a_blocked_image_is_in_no_file_of_the_run(e2e):
    for url, forms in e2e["blocked"].items():
        for form, data in forms.items():
            # The search finds the image where it is: the run without the list stored its
            # normalized bytes (the original ones too when it was small enough to pass as is).
            if data == forms["normalized"]:
                assert files_holding(e2e["plain"], data), (url, form)
            # With the list, no file anywhere under the output holds it: not the shards, not
            # work/ (kept here), not embeddings/, not the report.
            assert files_holding(e2e["blocklist"], data) == [], (url, form)
    assert (e2e["blocklist"] / "work" / "download").is_dir() and list((e2e["blocklist"] / "work" / "download").glob("*.tar"))
    keys = set(rows_of(e2e["blocklist"]).query("reason == 'unsafe: hash_blocklist'").index)
    for samples in (e2e["blocklist"] / "report" / "samples").glob("*.parquet"):
        assert keys.isdisjoint(pq.read_table(samples, columns=["key"]).column("key").to_pylist())
