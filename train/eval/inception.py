"""The FID Inception-v3: the network and weights every published FID is measured with.

FID is only comparable between papers and tools when it comes from one particular network:
TensorFlow's 2015-12-05 Inception-v3 graph, whose blocks differ slightly from torchvision's
Inception-v3. pytorch-fid ported it (its `FIDInception*` blocks) and publishes the weights as
`pt_inception-2015-12-05-6726825d.pth`, a plain state_dict; clean-fid's legacy mode and many
papers use the same file. curate builds the network from pytorch-fid's blocks, so that file
loads unchanged, and takes the weights from

    metrics.inception: /path/to/pt_inception-2015-12-05-6726825d.pth   a file (offline machines)
    metrics.inception: auto    torch hub's cache (~/.cache/torch/hub/checkpoints/), where
                               pytorch-fid keeps it too; downloaded there where there is internet

The features are pytorch-fid's: images in [0, 1] resized bilinearly to 299 × 299, scaled to
[-1, 1], the 2048-d output of the final average pool (FID, KID). The Inception Score uses the
1008-class logits without the bias (`pool @ fc.weight.T`), as the original TF code and
torch-fidelity ("logits_unbiased") do.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pytorch_fid.inception import FID_WEIGHTS_URL, FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2
from torchvision.models import inception_v3

from curate.pipeline.errors import UserError
from curate.pipeline.models.cache import cached

FID_WEIGHTS_FILE = FID_WEIGHTS_URL.rsplit("/", 1)[1]
# torch hub's convention: the file name carries the first hex digits of the file's sha256.
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
POOL_DIM, CLASSES = 2048, 1008


def fid_inception_network() -> torch.nn.Module:
    """pytorch-fid's FID Inception-v3 with uninitialised weights (torchvision's Inception-v3,
    1008 classes, no aux head, with the FID blocks), exactly the module its weights file fits."""
    net = inception_v3(weights=None, aux_logits=False, num_classes=CLASSES, init_weights=False)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE_1(1280)
    net.Mixed_7c = FIDInceptionE_2(2048)
    return net


class FIDInception(torch.nn.Module):
    """Images (N, 3, H, W) in [0, 1] -> (pool features (N, 2048), unbiased logits (N, 1008)),
    as pytorch-fid's InceptionV3(output_blocks=[3]) computes the pool features."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.net
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = n.Conv2d_2b_3x3(n.Conv2d_2a_3x3(n.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = n.Conv2d_4a_3x3(n.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b, n.Mixed_6c, n.Mixed_6d,
                      n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = block(x)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return pool, pool @ n.fc.weight.T


@dataclass
class LoadedInception:
    model: FIDInception  # eval mode, on `device`
    device: str
    source: str  # the file it was loaded from
    sha256: str  # of that file
    standard: bool  # the public file (its sha256 starts as its name says): FIDs comparable with papers'


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_file(setting: str) -> Path:
    """The weights file for `metrics.inception`: the path given, or torch hub's cached copy
    of pytorch-fid's file (fetched into the cache first where there is internet)."""
    if setting != "auto":
        path = Path(setting).expanduser()
        if not path.is_file():
            raise UserError(f"metrics.inception: no such file: {setting} (pytorch-fid's {FID_WEIGHTS_FILE})")
        return path
    path = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(path), hash_prefix=FID_WEIGHTS_SHA256_PREFIX)
        except Exception as exc:  # offline: URLError, timeouts, a proxy's refusal, ...
            raise UserError(
                f"metrics.inception: the FID Inception weights are not in {path.parent} and could not be "
                f"downloaded ({type(exc).__name__}: {str(exc).strip()[:120]}); fetch {FID_WEIGHTS_URL} "
                "where there is internet and set metrics.inception: PATH (or metrics.inception: off)") from exc
    return path


def load_inception(setting: str = "auto", device: str = "cpu") -> LoadedInception:
    """The FID Inception for `metrics.inception` on `device`, loaded at most once per process."""
    path = weights_file(setting)
    return cached(("fid-inception", str(path.resolve()), device), lambda: _load(path, device))


def _load(path: Path, device: str) -> LoadedInception:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"metrics.inception: cannot read {path} as a torch state_dict: {exc}") from exc
    if not isinstance(state, dict):
        raise UserError(f"metrics.inception: {path} holds a {type(state).__name__}, not a state_dict")
    net = fid_inception_network()
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong_shape:
        detail = "; ".join(f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for what, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("other shape", wrong_shape)) if keys)
        raise UserError(f"metrics.inception: {path} is not the FID Inception-v3 "
                        f"(pytorch-fid's {FID_WEIGHTS_FILE}): {detail}")
    net.load_state_dict(state)
    sha = _sha256(path)
    model = FIDInception(net).eval().requires_grad_(False).to(device)
    return LoadedInception(model, device, str(path), sha, sha.startswith(FID_WEIGHTS_SHA256_PREFIX))


def write_random_weights(path: Path, seed: int = 0) -> Path:
    """Save a randomly initialised FID Inception in the public file's format (a state_dict with
    its keys and shapes), for tests and benchmark dry runs on machines without the real file.
    He-initialised convolutions keep the activations of the 94-layer network at a usable scale."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = fid_inception_network()
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            elif isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=module.in_features ** -0.5)
    torch.save(net.state_dict(), path)
    return Path(path)
