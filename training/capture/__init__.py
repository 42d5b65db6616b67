"""Stage ``capture``: the encoder's prefill activations per block, written as resumable Parquet shards with Ray Data (``run``, ``output``)."""
