"""Command line: ``python -m jaxce demo`` and ``python -m jaxce verify``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usage = "usage: python -m jaxce {demo,verify} [options]"
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if not argv:
        print(usage, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from jaxce import _demo

        return _demo.main(rest)
    if command == "verify":
        from jaxce import verify

        return verify.main(rest)
    print(f"{usage}\nunknown command {command!r}; expected 'demo' or 'verify'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
