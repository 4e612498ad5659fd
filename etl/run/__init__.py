"""One stream's way through a run: plan, classify (transform + diff), send, ledger, pipeline."""
