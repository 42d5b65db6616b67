"""The retraining pipeline: its config (``config``), the run (``run``), resume state (``state``) and publishing (``publish``)."""
