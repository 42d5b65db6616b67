"""The Ray Serve application (imports ``shared`` only): OpenAI-compatible ingress -> Encoder
replica (prefill only, prefix KV cache) -> RouterHead (artifact + policy) -> one deployment
per target. ``app`` builds and deploys the graph; ``config`` is its one strict config;
``messages`` and ``schemas`` type what passes between deployments and over HTTP."""
