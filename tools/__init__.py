"""Demo and rehearsal tooling: outside the product's import graph."""
