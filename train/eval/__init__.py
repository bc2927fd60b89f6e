"""`curate eval`: how good and how fast a text-to-image model is, measured the way the field does.

    config.py      the eval config (YAML validated, like `curate run`'s and `curate train`'s)
    data.py        prompts (a file, or held-out shards' captions) and reference images (shards, a folder)
    sampler.py     text -> image: StableDiffusionPipeline's sampling, batched and made fast
    inception.py   the FID Inception-v3 (pytorch-fid's network and weights file): pool features, logits
    features.py    image sets -> Inception and CLIP features; the reference's cached next to it
    metrics.py     FID / KID / FD in CLIP space / Inception Score / CLIP score, from features (numpy)
    run.py         the whole evaluation: per (scheduler, steps) generate, measure, write eval.json
    page.py        eval.html (a table and a chart of quality against steps) and the grids
    ablation.py    `make ablation-demo`: raw vs curated training data, same model, same eval
"""
