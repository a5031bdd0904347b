"""`g2sd-cache inspect`: its flags and the report it prints."""
from __future__ import annotations

from g2sd_cache.cli.command import Command


def add(sub):
    p = sub.add_parser("inspect", help="summarise a cache: manifest, bytes per view, codec errors",
                       description="Print a cache's manifest summary, its bytes per view, and the relative RMS error "
                                   "and cosine of every codec against float32 targets.")
    p.add_argument("cache", help="cache directory or fsspec URL")
    p.add_argument("--sample", type=int, default=64, help="stored views to re-encode with every codec (default "
                   "%(default)s)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    return p


def run(args) -> int:
    import json
    from g2sd_cache.cache.inspect import format_report, inspect_report
    report = inspect_report(args.cache, args.sample)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


COMMAND = Command("inspect", add, run)
