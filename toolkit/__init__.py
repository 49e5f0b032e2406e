"""The library layer of ``gradnorm``: balancers, the record schema, the recorder, the DuckDB analysis and
the weights files.

Nothing here imports the hook layer (``gradnorm.hooks``) or the app (``gradnorm.app``); the contracts in
``pyproject.toml`` enforce it. Importing this package imports nothing heavy: ``gradnorm.toolkit.schema``
is what the app reads without pulling in torch.
"""

__version__ = "0.1.0"
