"""A small command line for the image builders.

``python -m hvstack.images build tiny --cache-dir DIR`` builds (or finds in the cache)
the image and prints its path on stdout; progress goes to stderr unless ``--quiet``.
``python -m hvstack.images list`` prints the known images. Errors print one line on
stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from hvstack.errors import HvError
from hvstack.images.catalog import CATALOG, build_image


def _progress(percent: float, step: str) -> None:
    sys.stderr.write(f"[{percent:3.0f}%] {step}\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hvstack.images")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build an image and print its path")
    build.add_argument("name", choices=sorted(CATALOG))
    build.add_argument("--cache-dir", type=Path, default=Path(".cache"), help="cache folder")
    build.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    commands.add_parser("list", help="list the images that can be built")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "list":
        for spec in CATALOG.values():
            sys.stdout.write(f"{spec.name}\t{spec.image_format}\t{spec.description}\n")
        return 0
    try:
        path = asyncio.run(
            build_image(args.name, args.cache_dir, None if args.quiet else _progress)
        )
    except HvError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
