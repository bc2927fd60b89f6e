"""The driver checks a config's open_clip model name before a run, without importing open_clip."""

import subprocess
import sys

import pytest

from curate.pipeline.errors import UserError
from curate.pipeline.models.clip import architecture_config, check_model_source, embedding_dim


def test_every_open_clip_architecture_is_known_with_its_config_and_others_are_refused():
    import open_clip

    for model in open_clip.list_models():
        assert architecture_config(model) == open_clip.get_model_config(model), model
        check_model_source(model, None)
    assert embedding_dim("ViT-L-14") == 768 and embedding_dim("ViT-B-32") == 512
    for bad in ("ViT-B-33", "", "../model_configs/ViT-B-32", "ViT-B-32.json"):
        assert architecture_config(bad) is None
        with pytest.raises(UserError, match="unknown open_clip architecture"):
            check_model_source(bad, None)
    with pytest.raises(UserError, match="has no pretrained tag"):
        check_model_source("ViT-B-32", "no-such-tag")
    with pytest.raises(UserError, match="checkpoint not found"):
        check_model_source("ViT-B-32", "/nonexistent/epoch_1.pt")


def test_checking_a_name_does_not_import_open_clip():
    # Importing open_clip (torch, torchvision, timm, transformers) cost the driver seconds at every start.
    code = ("import sys; from curate.pipeline.models.clip import check_model_source, embedding_dim; "
            "check_model_source('ViT-B-32', None); embedding_dim('ViT-L-14'); "
            "print(sorted(m for m in ('open_clip', 'torch', 'timm', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
