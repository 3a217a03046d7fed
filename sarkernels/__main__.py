"""``python -m sarkernels info``: which backends are compiled and usable here."""
import argparse
import json
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sarkernels")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="compiled backends, build details, and why one is unusable")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import format_info, info
        d = info()
        print(json.dumps(d, indent=2) if args.json else format_info(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
