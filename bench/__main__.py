"""``python -m bench``: the whole benchmark in one reproducible run (see ``bench.run``)."""

from bench.run import main

main()
