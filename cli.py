"""Command line of dta-ttfs: ``python cli.py fit|validate|test|predict -c CONFIG [...]``.

LightningCLI drives everything; ``cli_main(args)`` is the same entry point for tests.
"""

from dta_ttfs.cli import cli_main

if __name__ == "__main__":
    cli_main()
