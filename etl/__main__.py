"""`python -m etl` runs the same CLI as the `etl` console script."""

from etl.cli import main

main()
