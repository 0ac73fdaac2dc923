"""`python -m mistralrs` is the `mistralrs` command."""

from mistralrs.cli import main

main()
