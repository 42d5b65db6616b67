"""The top layer, free to import training and serving: the ``prefill-router`` CLI (``cli/``),
the retraining pipeline (``pipeline/``: config, run, state, publish), local Ray heads
(``local``, ``local_state``), Ray job submission (``jobs``), the KubeRay manifests (``k8s``)
and the end-to-end demo (``demo``, ``demo_chat``)."""
