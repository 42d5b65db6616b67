"""Stage ``data``: build the query table from offline sources (``build``) or import a table with its labels
(``importer``, ``import_config``, ``import_formats``, ``import_sources``)."""
