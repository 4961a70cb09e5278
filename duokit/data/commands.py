"""`duokit data fetch` and `duokit data verify`: the artefacts of duokit/data/data_manifest.yaml."""

from __future__ import annotations

import argparse
import sys

from duokit.data.manifest import ARTEFACTS, DEFAULT_DEST, DataError, fetch, verify


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="download and verify VNBench (annotations, videos)")
    actions = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    fetch_parser = actions.add_parser(
        "fetch", help="download, check and unpack; a no-op for what is already present and verified")
    fetch_parser.add_argument("which", nargs="?", default="all", choices=(*ARTEFACTS, "all"))
    verify_parser = actions.add_parser(
        "verify", help="report what is present, missing or wrong (exit code 1 if anything is)")
    verify_parser.add_argument("which", nargs="?", default="all", choices=(*ARTEFACTS, "all"))
    verify_parser.add_argument("--deep", action="store_true",
                               help="also hash the zip (sha256) and every unpacked video (CRC-32)")
    for parser in (fetch_parser, verify_parser):
        parser.add_argument("--dest", default=str(DEFAULT_DEST), help="data folder (default: %(default)s)")
        parser.add_argument("--manifest", default=None, help="manifest file (default: the one in duokit/data/)")
        parser.add_argument("--quiet", action="store_true", help="no progress bars or notes")
    fetch_parser.add_argument("--unpack-to", default=None,
                              help="unpack the videos here instead of in --dest (e.g. the zip on Drive, the "
                                   "videos on the VM's local disk)")
    fetch_parser.set_defaults(func=run_fetch)
    verify_parser.set_defaults(func=run_verify)


def run_fetch(args: argparse.Namespace) -> int:
    try:
        paths = fetch(args.which, args.dest, manifest=args.manifest, quiet=args.quiet, unpack_to=args.unpack_to)
    except DataError as err:
        print(f"duokit data fetch: {err}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    try:
        report = verify(args.dest, args.which, manifest=args.manifest, deep=args.deep, quiet=args.quiet)
    except DataError as err:
        print(f"duokit data verify: {err}", file=sys.stderr)
        return 1
    print(report)
    return 0 if report.ok else 1
