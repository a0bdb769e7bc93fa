"""The ``jaxce`` command (also ``python -m jaxce``): ``jaxce verify`` and ``jaxce bench``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

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
    """The ``jaxce`` argument parser, one sub-parser per command."""
    from jaxce import bench, verify

    prog = _program_name()
    top = argparse.ArgumentParser(
        prog=prog,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module, summary in (
        ("verify", verify, "check every loss's gradient four ways"),
        ("bench", bench, "time jaxce against optax and a plain formulation"),
    ):
        module.add_arguments(
            commands.add_parser(
                name,
                help=summary,
                description=module.DESCRIPTION,
                epilog=module.EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
        )
    return top


def _version() -> str:
    import jaxce

    return jaxce.__version__


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the command line and runs the command; returns the exit status.

    Bad arguments exit with status 2 through argparse. A missing optional package is one
    line on stderr naming the extra that installs it, and status 1.
    """
    from jaxce._optional import MissingExtra

    options = parser().parse_args(list(argv) if argv is not None else None)
    try:
        return int(options.run(options))
    except MissingExtra as error:
        print(f"{_program_name()} {options.command}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
