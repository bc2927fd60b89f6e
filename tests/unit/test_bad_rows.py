"""Hostile input that must not name a file or run code, without a run: tar member names that
could escape, a scan of the source for loaders that run code (pickle, yaml.load, torch.load without
weights_only), and a checkpoint carrying code. The bad rows and bad files through `curate run`:
tests/e2e/test_bad_rows_run.py."""

from __future__ import annotations

import ast
import os
import shutil
import tarfile

import pytest

from conftest import REPO
from curate.pipeline.tarshard import TarShardWriter


@pytest.mark.parametrize("key, ext", [("../evil", "jpg"), ("/abs", "jpg"), ("a/b", "jpg"), ("", "jpg"),
                                      ("0000000001", "../jpg"), ("0000000001", "x/y"), ("0000000001", ".jpg")])
def test_tar_writer_refuses_member_names_that_could_escape(tmp_path, key, ext):
    with TarShardWriter(tmp_path / "t.tar") as tar:
        with pytest.raises(ValueError):
            tar.write(key, {ext: b"x"})
        tar.write("0000000001", {"jpg": b"x", "latent.npy": b"y"})  # what curate writes is fine
    with tarfile.open(tmp_path / "t.tar") as t:
        assert t.getnames() == ["0000000001.jpg", "0000000001.latent.npy"]


# --- checkpoints load as weights only ----------------------------------------------------------

SOURCE_DIRS = ("pipeline", "filters", "train", "bench")


def _calls(tree: ast.AST, module: str, names: set[str]):
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in names
                and isinstance(node.func.value, ast.Name) and node.func.value.id == module):
            yield node


def test_no_source_loads_pickles_or_unsafe_yaml():
    offenders, torch_loads = [], 0
    for folder in SOURCE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for call in _calls(tree, "torch", {"load"}):
                torch_loads += 1
                weights_only = [k for k in call.keywords if k.arg == "weights_only"]
                if not (weights_only and isinstance(weights_only[0].value, ast.Constant) and weights_only[0].value.value is True):
                    offenders.append(f"{path}:{call.lineno} torch.load without weights_only=True")
            for call in _calls(tree, "yaml", {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load",
                                              "full_load_all"}):
                offenders.append(f"{path}:{call.lineno} yaml.{call.func.attr}: use yaml.safe_load")
            for call in _calls(tree, "pickle", {"load", "loads"}):
                offenders.append(f"{path}:{call.lineno} pickle.{call.func.attr}")
            for call in _calls(tree, "np", {"load"}):
                if any(k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                       for k in call.keywords):
                    offenders.append(f"{path}:{call.lineno} np.load with allow_pickle")
            for call in _calls(tree, "open_clip", {"create_model_and_transforms", "create_model", "load_checkpoint"}):
                if not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in call.keywords):
                    offenders.append(f"{path}:{call.lineno} open_clip.{call.func.attr} without weights_only=True")
    assert offenders == []


class _Payload:
    """Pickles to a call of os.mkdir: what a hostile checkpoint would run on load."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_a_checkpoint_that_carries_code_is_refused_not_run(tmp_path):
    torch = pytest.importorskip("torch")
    from curate.pipeline.models.clip import TINY_CLIP_DIR, load_clip

    model_dir = tmp_path / "hostile-clip"
    model_dir.mkdir()
    shutil.copy(TINY_CLIP_DIR / "open_clip_config.json", model_dir)
    marker = tmp_path / "pwned"
    torch.save({"state_dict": _Payload(str(marker))}, model_dir / "open_clip_pytorch_model.bin")

    with pytest.raises(Exception) as refused:
        load_clip(f"local-dir:{model_dir}", device="cpu", precision="fp32")
    assert "weights_only" in str(refused.value) or "Unsupported global" in str(refused.value), refused.value
    assert not marker.exists()
    # The payload is real: loading the same file as a full pickle runs it.
    torch.load(model_dir / "open_clip_pytorch_model.bin", weights_only=False)
    assert marker.is_dir()
