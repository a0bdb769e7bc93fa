"""The ``jaxce`` command (also ``python -m jaxce``): ``jaxce verify`` and ``jaxce bench``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jaxce
from jaxce import bench, verify

DESCRIPTION = """\
jaxce: numerically stable, jit-compiled cross-entropy losses for JAX.

  verify  check every loss's gradient: closed form, jax.grad, an independent reference,
          finite differences and forward mode
  bench   time jaxce against optax and a plain formulation at your shape, dtype and device

`jaxce COMMAND --help` says more about each."""

EPILOG = """\
examples:
  jaxce verify
  jaxce verify --loss softmax_cross_entropy_with_integer_labels --dtype bfloat16
  jaxce bench --shape 8192 32000 --dtype bfloat16

The end-to-end demo (training on real data, verification, a benchmark table) is
`make demo` in a clone of the repository."""


def _program_name() -> str:
    return "python -m jaxce" if sys.argv[0].endswith("__main__.py") else "jaxce"


def parser() -> argparse.ArgumentParser:
    """The ``jaxce`` argument parser; each command module adds its own sub-parser."""
    top = argparse.ArgumentParser(
        prog=_program_name(),
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--version", action="version", version=f"%(prog)s {jaxce.__version__}")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    verify.register(commands)
    bench.register(commands)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the command line and runs the command; returns the exit status.

    Bad arguments exit with status 2 through argparse. A missing optional package is one
    line on stderr naming the extra that installs it, and status 1.
    """
    options = parser().parse_args(list(argv) if argv is not None else None)
    return int(options.run(options))


if __name__ == "__main__":
    sys.exit(main())
