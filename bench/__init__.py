"""`make bench`: the performance benchmark of SPEC §8 (see bench/run.py for how to run it)."""
