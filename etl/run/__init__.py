"""One stream's way through a run: transform, diff, the flow of rows to events, the pipeline."""
