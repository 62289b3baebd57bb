"""`python -m covey` runs the same CLI as the `covey` console script."""

from covey.cli import main

main()
