"""``python -m cluster.cli``: the ``prefill-router`` command (the RayJob entrypoints use this form)."""

from cluster.cli import main

if __name__ == "__main__":
    main()
