"""Stage ``label``: score every target on every query with Ray Data (``run``), through its backend (``backends``) and the answer scorers (``scoring``)."""
