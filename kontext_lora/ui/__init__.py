"""`kontext-lora ui`: a local web app over the files the CLI reads and writes (datasets, configs, runs, sweeps).

The pages read the same folders, configs, metrics.jsonl, validation grids, best.json and sweep summaries as the
command line; a run is started as the same `kontext-lora train --config ...` process. Nothing is kept anywhere
else, except a thumbnail cache.
"""
