"""The offline pipeline, one folder per stage; stage folders import only ``shared`` and this root.

Stages: ``data/`` (build or import the query table), ``label/`` (score every target),
``capture/`` (prefill activations), ``fit/`` (probes, tuning, SharedTrunkNet on Ray Train),
``evaluate/`` (against the oracle, single models and semantic baselines).

The root holds what two or more stages share: ``queries`` and ``labels`` (the query table's
and the label folders' formats), ``shards`` (resumable Parquet shards), ``dataset``
(activations + labels as arrays), ``metrics`` (AUC, Brier), ``loop`` (the early-stopping
training loop), ``embedder`` (MiniLM) and ``semantic_text`` (what a semantic baseline embeds).
"""
