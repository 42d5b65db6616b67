"""Stage ``fit``: layer probes (``probe``, ``separability``), cross-validated choice of blocks and PCA size (``tune``) and SharedTrunkNet on Ray Train (``run``, ``train_ray``)."""
