"""The torch modules behind filters/heads.py, named layer by layer like the published
weights, so that those state_dicts load as they are (`load_state_dict(strict=True)`).

Kept apart from filters/heads.py because importing torch takes seconds: a config check
only pays for it when the config names a head.
"""

from __future__ import annotations

import torch
from torch import nn


class Normalization(nn.Module):
    """Keras' Normalization layer: (x - mean) / max(sqrt(variance), 1e-7), with `mean` and
    `variance` adapted on the training embeddings (Keras' `count` weight is not needed)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("variance", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.variance.sqrt().clamp_min(1e-7)


class LaionNsfwMlp(nn.Module):
    """LAION's CLIP-based NSFW detector (github.com/LAION-AI/CLIP-based-NSFW-Detector).

    An AutoKeras model on the L2-normalized CLIP image embedding:
    Normalization → Dense → ReLU → … → Dense(1) → sigmoid = P(unsafe). Its two releases:

        ViT-L/14 (clip_autokeras_binary_nsfw): 768 → 64 → 512 → 256 → 1   (hidden=(64, 512, 256))
        ViT-B/32 (clip_autokeras_nsfw_b32):    512 → 32 → 32 → 1          (hidden=(32, 32))

    (their Dropout layers do nothing at inference). state_dict keys, as in the torch port
    posted in LAION-AI/CLIP-based-NSFW-Detector issue #7: `norm.mean`, `norm.variance`,
    `linear_1.weight`, `linear_1.bias`, …, `linear_N.*`. From the Keras model: the
    Normalization layer's `mean` and `variance` → `norm.mean`, `norm.variance`; the i-th
    Dense layer (`dense`, `dense_1`, …) → `linear_{i+1}`, with `weight = kernel.T` (Keras
    stores kernels as [in, out], torch as [out, in]) and `bias = bias`. Converting LAION's
    download once, where TensorFlow and AutoKeras are installed (a recipe, not run by the
    tests; curate itself needs neither):

        m = tf.keras.models.load_model("clip_autokeras_binary_nsfw", custom_objects=ak.CUSTOM_OBJECTS, compile=False)
        norm = m.get_layer("normalization")
        state = {"norm.mean": torch.tensor(norm.mean.numpy()).flatten(),
                 "norm.variance": torch.tensor(norm.variance.numpy()).flatten()}
        dense = [layer for layer in m.layers if isinstance(layer, tf.keras.layers.Dense)]
        for i, layer in enumerate(dense, 1):
            state[f"linear_{i}.weight"] = torch.tensor(layer.kernel.numpy().T)
            state[f"linear_{i}.bias"] = torch.tensor(layer.bias.numpy())
        torch.save(state, "laion-nsfw-vit-l-14.pt")
    """

    def __init__(self, input_dim: int = 768, hidden: tuple[int, ...] = (64, 512, 256)):
        super().__init__()
        self.input_dim = input_dim
        self.norm = Normalization(input_dim)
        dims = [input_dim, *hidden, 1]
        self.n_linear = len(dims) - 1
        for i in range(self.n_linear):
            self.add_module(f"linear_{i + 1}", nn.Linear(dims[i], dims[i + 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        for i in range(1, self.n_linear):
            x = torch.relu(getattr(self, f"linear_{i}")(x))
        return torch.sigmoid(getattr(self, f"linear_{self.n_linear}")(x)).squeeze(-1)

    @classmethod
    def from_state_dict(cls, state: dict) -> "LaionNsfwMlp":
        """The module the state_dict's shapes describe, with its weights loaded."""
        if "norm.mean" not in state or "linear_1.weight" not in state:
            raise ValueError("expected the keys norm.mean, norm.variance, linear_1.weight, ... "
                             f"of LAION's NSFW head; got {_some_keys(state)}")
        n = 1
        while f"linear_{n + 1}.weight" in state:
            n += 1
        hidden = tuple(int(state[f"linear_{i}.weight"].shape[0]) for i in range(1, n))
        net = cls(int(state["norm.mean"].shape[0]), hidden)
        _load_strict(net, state)
        return net


class AestheticMlp(nn.Module):
    """The LAION aesthetic predictor (github.com/christophschuhmann/improved-aesthetic-predictor,
    e.g. sac+logos+ava1-l14-linearMSE.pth): a linear MLP on the L2-normalized CLIP image
    embedding giving a 1–10 rating. Layers as in its `MLP` class, so its .pth loads as is:

        layers.0  Linear(input_dim, 1024)   layers.1 Dropout(0.2)
        layers.2  Linear(1024, 128)         layers.3 Dropout(0.2)
        layers.4  Linear(128, 64)           layers.5 Dropout(0.1)
        layers.6  Linear(64, 16)
        layers.7  Linear(16, 1)

    (no activations: the original has its ReLUs commented out). input_dim is 768 for the
    published ViT-L/14 weights; other CLIP sizes need weights trained for them.
    """

    def __init__(self, input_dim: int = 768):
        super().__init__()
        self.input_dim = input_dim
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)

    @classmethod
    def from_state_dict(cls, state: dict) -> "AestheticMlp":
        if "layers.0.weight" not in state:
            raise ValueError("expected the keys layers.0.weight, layers.0.bias, ..., layers.7.bias "
                             f"of the aesthetic predictor; got {_some_keys(state)}")
        net = cls(int(state["layers.0.weight"].shape[1]))
        _load_strict(net, state)
        return net


def _some_keys(state: dict, n: int = 6) -> str:
    keys = list(state)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") if keys else "no keys"


def _load_strict(net: nn.Module, state: dict) -> None:
    """load_state_dict(strict=True), its multi-line complaint folded into one line."""
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        raise ValueError("; ".join(lines) or str(exc)) from None
    net.eval()
