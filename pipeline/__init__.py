"""curate: LAION-style URL lists in, clean WebDataset shards out."""
