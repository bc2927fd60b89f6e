"""The per-shard stages of `curate run`, side by side: each imports only the shared layers
below it (records, layout, shards, models, filters), never another stage. pipeline/run.py
wires them together."""
