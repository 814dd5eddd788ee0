"""What every command line shares: bad input is one ``error:`` line and exit status 2."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

EXIT_USAGE = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``error: ...``), not the usage block too."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def parser(prog: str, description: str | None) -> ArgumentParser:
    """A command's parser: ``description`` (its module docstring) shown as written."""
    return ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def fail(message: object) -> int:
    """Print one ``error:`` line (whitespace folded) and return the usage exit status."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return EXIT_USAGE
