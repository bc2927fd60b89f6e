"""Train the tiny CLIP that curate ships, on curate's own synthetic captioned images.

    python -m curate.train.tiny_clip --out pipeline/assets/tiny-clip --steps 300 --seed 0

Nothing is downloaded: the images and captions come from `pipeline.synthetic`
(coloured shapes on a coloured background, captions derived from the same
scene), generated on the fly, and the tokenizer is open_clip's SimpleTokenizer,
which ships inside open_clip.  The result is an open_clip `local-dir:` folder
(`open_clip_config.json` + `open_clip_model.safetensors`, fp16) that
`pipeline.clip_model.load_clip(pipeline.clip_model.TINY_CLIP)` loads through
open_clip's ordinary code path.

What it has to learn is what the demo needs: tell a scene's own caption from a
deliberately wrong one (`pipeline.synthetic.wrong_caption`, the caption of
another random scene).  The standard CLIP contrastive loss is exactly that
task: within a batch every other caption is the caption of another random scene.
Progress is reported as the ROC AUC of cosine similarity, (image, right caption)
vs (image, wrong caption), on a fixed held-out set.

The script is deterministic given --seed (and the torch build / thread count).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import random
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from curate.pipeline.demo import synthetic

# ---------------------------------------------------------------------------
# The model: a few MB.  The text token embedding (49408 x text width, the
# standard CLIP BPE vocabulary) is most of it; the towers themselves are small.
# ---------------------------------------------------------------------------
MODEL_CFG = {
    "embed_dim": 128,
    "vision_cfg": {
        "image_size": 64,
        "patch_size": 8,
        "width": 128,
        "layers": 4,
        "head_width": 32,  # 4 heads
        "mlp_ratio": 4.0,
    },
    "text_cfg": {
        "context_length": 32,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 3,
    },
}

# Images are squashed to 64x64 rather than centre-cropped: a caption speaks of
# the whole image ("on the left of ..."), and a centre crop of a 2:1 image can
# cut away the very objects it names.  Training also sees centre crops (see
# TRAIN_CROP_FRACTION) so that scores stay sensible under either resize.
PREPROCESS_CFG = {
    "mean": [0.48145466, 0.4578275, 0.40821073],  # OpenAI CLIP's, as most open_clip models
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "squash",
}
TRAIN_CROP_FRACTION = 0.25

# Image sizes like a LAION-style dataset's after download (random aspect ratio
# up to 2:1, either orientation); half the training images go through a JPEG
# round trip as they do in the pipeline.
MIN_SIDE, MAX_SIDE = 64, 320
JPEG_FRACTION = 0.5
EVAL_SCENES = 500


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder to write the open_clip local-dir model into")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps before the cosine decay")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    return p.parse_args()


# ---------------------------------------------------------------------------
# Data: random scenes, rendered at random sizes, through the model's transform.
# ---------------------------------------------------------------------------
def random_size(rng: random.Random) -> tuple[int, int]:
    ratio = rng.uniform(1.0, 2.0)
    short = rng.randint(MIN_SIDE, int(MAX_SIDE / ratio))
    long = min(MAX_SIDE, round(short * ratio))
    return (long, short) if rng.random() < 0.5 else (short, long)


def draw(scene: synthetic.Scene, rng: random.Random, jpeg: bool) -> Image.Image:
    image = synthetic.render(scene, *random_size(rng), rng)
    if jpeg:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=rng.randint(75, 95))
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image


def hard_negative(scene: synthetic.Scene, rng: random.Random) -> synthetic.Scene:
    """The scene with one thing changed: a count, a shape, a colour, the position or the background.

    Random in-batch captions differ in almost everything, so colours alone would
    nearly separate them; one-change captions (as NegCLIP's) make the model
    also read counts, shapes and positions, and bind each colour to its shape.
    """
    while True:
        objects = list(scene.objects)
        background, position = scene.background, scene.position
        i = rng.randrange(len(objects))
        change = rng.choice(("count", "shape", "colour", "position", "background"))
        if change == "count":
            objects[i] = dataclasses.replace(objects[i], count=rng.randint(1, synthetic.MAX_COUNT))
        elif change == "shape":
            objects[i] = dataclasses.replace(objects[i], shape=rng.choice(synthetic.SHAPES))
        elif change == "colour":
            objects[i] = dataclasses.replace(objects[i], colour=rng.choice(list(synthetic.COLOURS)))
        elif change == "position":
            position = rng.choice((None, *synthetic.POSITIONS))
        else:
            background = rng.choice(list(synthetic.COLOURS))
        pairs = [(o.shape, o.colour) for o in objects]
        if len(set(pairs)) < len(pairs):
            continue  # two groups of the same coloured shape: not a scene random_scene makes
        try:
            candidate = synthetic.Scene(background, objects, position)
        except ValueError:  # e.g. an object the colour of the background
            continue
        if synthetic.caption(candidate) != synthetic.caption(scene):
            return candidate


def train_batch(rng: random.Random, n: int, transforms: dict, tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n images, their captions and one hard-negative caption each (tokenized)."""
    images, captions, negatives = [], [], []
    for _ in range(n):
        scene = synthetic.random_scene(rng)
        image = draw(scene, rng, jpeg=rng.random() < JPEG_FRACTION)
        transform = transforms["crop"] if rng.random() < TRAIN_CROP_FRACTION else transforms["squash"]
        images.append(transform(image))
        captions.append(synthetic.caption(scene))
        negatives.append(synthetic.caption(hard_negative(scene, rng)))
    return torch.stack(images), tokenizer(captions), tokenizer(negatives)


def held_out_set(seed: int) -> list[tuple[Image.Image, str, str, str]]:
    """(image, right caption, wrong caption, one-change caption) from an rng training never uses."""
    rng = random.Random(f"tiny-clip-eval-{seed}")
    rows = []
    for _ in range(EVAL_SCENES):
        scene = synthetic.random_scene(rng)
        image = draw(scene, rng, jpeg=True)
        wrong = synthetic.wrong_caption(scene, rng)
        rows.append((image, synthetic.caption(scene), wrong, synthetic.caption(hard_negative(scene, rng))))
    return rows


# ---------------------------------------------------------------------------
# Evaluation: ROC AUC of cosine similarity, right vs wrong caption.
# ---------------------------------------------------------------------------
def roc_auc(positives: list[float], negatives: list[float]) -> float:
    """P(random positive scores above random negative), ties counting half (Mann-Whitney U)."""
    scored = sorted([(s, 1) for s in positives] + [(s, 0) for s in negatives])
    rank_sum, i = 0.0, 0
    while i < len(scored):
        j = i
        while j < len(scored) and scored[j][0] == scored[i][0]:
            j += 1
        mean_rank = (i + 1 + j) / 2  # 1-based ranks i+1..j share their mean
        rank_sum += mean_rank * sum(label for _, label in scored[i:j])
        i = j
    n_pos, n_neg = len(positives), len(negatives)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


@torch.no_grad()
def evaluate(model, transform, tokenizer, rows, device: str) -> tuple[float, float]:
    """ROC AUC of the right caption vs wrong_caption (the demo's fault), and vs a one-change caption."""
    was_training = model.training
    model.eval()
    images = torch.stack([transform(row[0]) for row in rows]).to(device)
    image_features = F.normalize(model.encode_image(images).float(), dim=-1)
    scores = []
    for column in (1, 2, 3):
        text = tokenizer([row[column] for row in rows]).to(device)
        text_features = F.normalize(model.encode_text(text).float(), dim=-1)
        scores.append((image_features * text_features).sum(-1).tolist())
    model.train(was_training)
    return roc_auc(scores[0], scores[1]), roc_auc(scores[0], scores[2])


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------
def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # As open_clip's trainer: no decay on gains, biases, embeddings, logit scale.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.ndim < 2 or "embedding" in name or "logit_scale" in name or "class_embedding" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def contrastive_loss(image_features, text_features, negative_features, logit_scale) -> torch.Tensor:
    """CLIP's symmetric cross-entropy: the i-th image belongs with the i-th caption.

    The hard-negative captions are extra wrong answers for the image-to-text side.
    """
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(len(logits), device=logits.device)
    image_to_text = torch.cat([logits, logit_scale * image_features @ negative_features.T], dim=1)
    return (F.cross_entropy(image_to_text, labels) + F.cross_entropy(logits.T, labels)) / 2


def save(model: torch.nn.Module, out: Path, info: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    # fp16 halves the folder; open_clip copies it into the fp32 model on load.
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    (out / "open_clip_model.safetensors").chmod(0o644)  # safetensors writes it owner-only
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    rng = random.Random(args.seed)

    model = open_clip.CLIP(**MODEL_CFG).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    size = MODEL_CFG["vision_cfg"]["image_size"]
    transforms = {
        "squash": image_transform_v2(PreprocessCfg(size=size, **PREPROCESS_CFG), is_train=False),
        "crop": image_transform_v2(PreprocessCfg(size=size, **{**PREPROCESS_CFG, "resize_mode": "shortest"}), is_train=False),
    }
    tokenizer = open_clip.SimpleTokenizer(context_length=MODEL_CFG["text_cfg"]["context_length"])
    held_out = held_out_set(args.seed)
    optimizer = torch.optim.AdamW(
        param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6
    )
    print(f"tiny CLIP: {n_params / 1e6:.2f} M parameters; {args.steps} steps of {args.batch_size}", flush=True)

    model.train()
    start = time.time()
    history = []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        images, text, negatives = train_batch(rng, args.batch_size, transforms, tokenizer)
        text = torch.cat([text, negatives]).to(args.device)  # one pass through the text tower
        image_features, text_features, logit_scale = model(images.to(args.device), text)
        text_features, negative_features = text_features.split(args.batch_size)
        loss = contrastive_loss(image_features, text_features, negative_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # as in CLIP: temperature at most 100
            model.logit_scale.clamp_(0, math.log(100))

        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            elapsed = time.time() - start
            print(
                f"step {done:5d}  loss {loss.item():.3f}  lr {lr_at(step, args):.2e}  "
                f"scale {logit_scale.item():5.1f}  {elapsed:6.0f}s",
                flush=True,
            )
        if done % args.eval_every == 0 or done == args.steps:
            auc, hard_auc = evaluate(model, transforms["squash"], tokenizer, held_out, args.device)
            history.append(
                {"step": done, "auc": round(auc, 4), "one_change_auc": round(hard_auc, 4),
                 "seconds": round(time.time() - start, 1)}
            )
            print(f"step {done:5d}  held-out ROC AUC {auc:.4f}  (vs one-change captions {hard_auc:.4f})", flush=True)

    info = {
        "command": f"python -m curate.train.tiny_clip --out {args.out} --steps {args.steps} --seed {args.seed}",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "parameters": n_params,
        "train_seconds": round(time.time() - start, 1),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "history": history,
    }
    save(model, args.out, info)

    # Check the saved folder the way the pipeline will load it (fp16 round trip included).
    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{args.out.resolve()}", weights_only=True)
    auc, hard_auc = evaluate(loaded, preprocess, open_clip.get_tokenizer(f"local-dir:{args.out.resolve()}"), held_out, "cpu")
    crop_auc, _ = evaluate(loaded, transforms["crop"], tokenizer, held_out, "cpu")
    info["saved"] = {"auc": round(auc, 4), "one_change_auc": round(hard_auc, 4), "auc_center_crop": round(crop_auc, 4)}
    (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(
        f"saved {args.out}: held-out ROC AUC {auc:.4f}, vs one-change captions {hard_auc:.4f}, "
        f"centre-crop preprocessing {crop_auc:.4f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
