"""etl: keep Hyperengage in step with your own users and workspaces tables.

The library API is four functions with keyword-only arguments that mirror the
command-line options; each returns what the run did (see docs/production.md, "Library API"):

    import etl
    report = etl.sync(source_url="postgresql+psycopg://readonly@db/app")

The `etl` command line is built on the same functions.
"""

# Set before the imports below: etl.delivery.load and etl.cli read it while etl.api loads.
__version__ = "0.1.0"

import gc

# Importing etl and the libraries it runs on (SQLAlchemy, psycopg, structlog,
# PyYAML, ...) makes ~55,000 objects that live as long as the process; the cyclic
# garbage collector would walk them ~120 times while they are being made (~45 ms,
# a tenth of a no-change sync's process). It is paused for these imports only and
# left as it was found. What they made then goes straight to the oldest generation
# (gc.freeze() then gc.unfreeze(): still collectable, at the next full collection),
# instead of being walked by the next young collections on its way there (~18 ms).
# The command line then freezes it for good (etl.cli.main).
_collecting = gc.isenabled()
gc.disable()
try:
    # `diff` the function shadows the `etl.run.diff` submodule as an attribute of the
    # package; `from etl.run.diff import changes` still finds the module (sys.modules).
    from etl.api import backfill, diff, sync, validate
finally:
    gc.freeze()
    gc.unfreeze()
    if _collecting:
        gc.enable()

__all__ = ["__version__", "backfill", "diff", "sync", "validate"]
