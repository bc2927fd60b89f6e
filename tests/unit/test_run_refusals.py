"""What `curate run` refuses, and that it refuses before a cluster starts or anything is written."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import write_config
from curate.pipeline.config import dump_config, load_config
from curate.pipeline.errors import UserError
from curate.pipeline.run import run

UNREACHABLE = "tcp://127.0.0.1:9"  # the discard port: nothing listens there


@pytest.fixture()
def urls(tmp_path):
    pd.DataFrame({"URL": ["http://127.0.0.1:9/a.jpg"], "TEXT": ["a red circle"], "truth": ["ok"]}).to_parquet(
        tmp_path / "urls.parquet", index=False)
    return tmp_path / "urls.parquet"


def test_a_changed_config_is_refused_before_connecting_to_any_cluster(tmp_path, urls):
    old = load_config(write_config(tmp_path / "old.yaml", urls, tmp_path / "out", resize={"size": 64}))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.yaml").write_text(dump_config(old))
    new = load_config(write_config(tmp_path / "new.yaml", urls, tmp_path / "out", dask={"scheduler": UNREACHABLE}))
    # Refused for the config, naming the key: the unreachable scheduler was never asked.
    with pytest.raises(UserError, match=r"different config \(resize\.size\)"):
        run(new, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.yaml"]


def test_an_input_without_rows_writes_nothing(tmp_path):
    pd.DataFrame({"URL": pd.Series([], dtype="string"), "TEXT": pd.Series([], dtype="string"),
                  "truth": pd.Series([], dtype="string")}).to_csv(tmp_path / "empty.csv", index=False)
    cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path / "empty.csv", tmp_path / "out",
                                   dask={"scheduler": UNREACHABLE}))
    stats = run(cfg, progress=False)
    assert stats["empty_input"] and stats["rows_in"] == 0
    assert not (tmp_path / "out").exists()


def test_a_yaml_error_names_the_cause_and_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("input:\n  paths: [a.parquet]\noutput: {path: out\n")
    with pytest.raises(UserError) as exc:
        load_config(path)
    message = str(exc.value)
    assert "not valid YAML (line " in message
    assert message.rsplit(": ", 1)[1].strip()  # the parser's words after the line
