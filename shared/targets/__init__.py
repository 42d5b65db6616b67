"""The target backends, one class per module, each registered with ``shared.backends.register_backend``.

Every module here is imported when the registry is first read (:func:`shared.backends.backend_names`),
so a module's top level imports only light things; torch, transformers, httpx and vllm are
imported inside the methods that use them.
"""
