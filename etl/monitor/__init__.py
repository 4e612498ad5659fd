"""After a run: metrics file, notify URL, run outcome."""
