"""Tables and targets of the benchmark, printed."""

import math


def fmt(value, spec):
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def print_table(header, rows):
    print()
    for line in header:
        print(line)
    width = max(60, *(len(r["name"]) for r in rows))
    print(f"| {'measure':<{width}} | {'median ms':>10} | {'p10':>9} | {'p90':>9} | {'peak MiB':>8} | {'ratio':>6} |")
    print(f"|{'-' * (width + 2)}|{'-' * 11}:|{'-' * 10}:|{'-' * 10}:|{'-' * 9}:|{'-' * 7}:|")
    for r in rows:
        s = r["stats"]
        cells = [
            f"{fmt(s['median'], '.3f'):>10}",
            f"{fmt(s['p10'], '.3f'):>9}",
            f"{fmt(s['p90'], '.3f'):>9}",
            f"{fmt(r['peak_mib'], '.1f'):>8}",
            f"{fmt(r['ratio'], '.3f'):>6}",
        ]
        print(f"| {r['name']:<{width}} | " + " | ".join(cells) + " |")


def print_checks(checks):
    print("\nTargets (ratio <= limit)")
    for name, value, limit in checks:
        verdict = "met" if value is not None and value <= limit else "NOT met"
        print(f"  {verdict:<8} {name:<64} {fmt(value, '8.3f')}  (<= {limit})")
