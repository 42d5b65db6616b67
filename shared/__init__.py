"""The bottom layer: what training and serving both use, importing nothing of the project above it.

- ``config``, ``storage``, ``cli_utils``, ``ray_boot``: strict YAML configs, local/s3:// I/O,
  the CLI helpers and the one Ray bootstrap (``ensure_ray``).
- ``registry``, ``models``, ``model_cmd``: the model registry, loading models, the ``models`` command.
- ``backends`` and ``targets/``: the target backend contract and its registry, and the backends
  (transformers, openai, vllm: one class each) that labelling and serving both answer with.
- ``features``, ``batching``, ``encoder``, ``prefix``: feature block names and poolings, and
  the prefill encoder (with prefix sharing) used by capture and by the Encoder replica.
- ``trunk``, ``routing``, ``policy``, ``artifact``: SharedTrunkNet for inference, the routing
  arithmetic and exact sweeps, the routing policies (a registry: tolerance, value, one class per
  new policy), and the versioned router artifact (its file set, saving, loading and copying).
"""

__version__ = "0.1.0"
