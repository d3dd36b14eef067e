"""One step's kernels from ncu's CSV table (scripts/ncu_step_profile.sh), in order and summed by kernel.

A step is the span from one launch of the loss kernel (the first kernel whose name holds "mse",
else "adam", that ran at least three times) to the next; the second such span is shown, the
first being possibly cut by ncu's --launch-skip. Times are gpu__time_duration.sum in µs.
"""
import collections
import csv
import re
import sys


def rows_of(path):
    with open(path) as f:
        lines = [line for line in f if line.startswith('"')]  # ncu's own messages are not quoted
    rows = []
    for r in csv.DictReader(lines):
        if r.get("Metric Name") == "gpu__time_duration.sum":
            ns = float(r["Metric Value"].replace(",", ""))
            rows.append((int(r["ID"]), re.sub(r"\(.*", "", r["Kernel Name"])[:90], ns / 1000.0))
    return sorted(rows)


def main(path):
    rows = rows_of(path)
    if not rows:
        sys.exit(f"{path}: no kernel was profiled (is --launch-skip past the run's last launch?)")
    for marker in ("mse", "adam"):
        at = [i for i, (_, name, _) in enumerate(rows) if marker in name.lower()]
        if len(at) >= 3:
            break
    else:
        sys.exit(f"{path}: {len(rows)} kernels, but no loss or Adam kernel ran three times: profile more launches")
    step = rows[at[1]:at[2]]
    for _, name, us in step:
        print(f"{us:8.1f}  {name}")
    print(f"one step: {sum(us for _, _, us in step):.1f} us in {len(step)} launches")
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for _, name, us in step:
        by_name[name][0] += 1
        by_name[name][1] += us
    print("by kernel:")
    for name, (count, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1]):
        print(f"{us:8.1f}  x{count:<3d} {name}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: ncu_step_table.py NCU_CSV")
    main(sys.argv[1])
