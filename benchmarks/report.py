"""Prints each benchmark group of benchmarks/last.json with medians and ratios to ours."""
import json
import os
import sys

path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "last.json")
data = json.load(open(path))
groups = {}
for b in data["benchmarks"]:
    who = b["params"]["who"]
    groups.setdefault(b["group"], {})[who] = b["stats"]["median"] * 1e3
print(f"machine: {data['machine_info'].get('cpu', {}).get('brand_raw', '?')}, "
      f"{data['machine_info'].get('cpu', {}).get('count', '?')} cpus; {data['datetime']}")
print("| case | who | median ms | competitor / ours |\n|---|---|---|---|")
for group, rows in groups.items():
    ours = rows.get("ours")
    for who, ms in sorted(rows.items(), key=lambda kv: kv[0] != "ours"):
        ratio = "" if who == "ours" or ours is None else f"{ms / ours:.2f}x"
        print(f"| {group} | {who} | {ms:.3f} | {ratio} |")
