"""`python -m notifier ...`: the operator's command line."""

from notifier.cli import main

main()
