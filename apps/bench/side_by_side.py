"""One table from relora_bench and peft_reference.py JSON files: both figures, the ratios, and
the targets of issue 5 (met or not).

usage: python3 side_by_side.py --relora a.json b.json ... --peft c.json d.json ... [--md FILE]
"""
import argparse, json, math


def load(paths, key):
    rows = []
    for p in paths:
        try:
            with open(p) as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            print(f"side_by_side: skipping {p}: {e}")
            continue
        for r in doc.get(key, []):
            r = dict(r)
            r.setdefault("threads", doc.get("threads"))
            rows.append(r)
    return rows


def median_rows(rows, key):
    """One row per key (several rounds of the same case): the round whose step time is the median
    (the lower middle for an even count), with every round's step time in "rounds_ms"."""
    groups = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    out = []
    for group in groups.values():
        group.sort(key=lambda r: r["step_ms"])
        chosen = dict(group[(len(group) - 1) // 2])
        chosen["rounds_ms"] = [r["step_ms"] for r in group]
        out.append(chosen)
    return out


def fmt(x, digits=4):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if abs(x) >= 100:
        return f"{x:.1f}"
    return f"{x:.{digits}g}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--relora", nargs="*", default=[])
    ap.add_argument("--peft", nargs="*", default=[])
    ap.add_argument("--md", default="")
    a = ap.parse_args()
    rel = median_rows([r for r in load(a.relora, "results") if "skipped" not in r],
                      lambda r: (r["case"], r["backend"], r["math"]))
    pef = median_rows([r for r in load(a.peft, "steps") if r.get("mode", "peft") == "peft"],
                      lambda r: (r["case"], r["device"], r["math"]))
    peft_of = {(r["case"], r["device"], r["math"]): r for r in pef}

    # "floor": every product the step needs (large and LoRA) timed alone, the GEMM floor;
    # "large floor": the large products only (X W^T, dY W), shown beside it.
    lines = ["| case | backend | math | thr | relora ms | floor ms | step/floor | large floor ms | step/large "
             "| TFLOP/s | PEFT ms | PEFT/relora | PEFT fp32 / relora | relora MiB | PEFT MiB | target | met "
             "| relora rounds ms | PEFT rounds ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rel:
        key = (r["case"], r["backend"], r["math"])
        p = peft_of.get(key)
        p32 = peft_of.get((r["case"], r["backend"], "strict"))
        ms = r["step_ms"]
        ratio = p["step_ms"] / ms if p else None
        ratio32 = p32["step_ms"] / ms if p32 else None
        over = r.get("step_over_floor_all")
        over_large = r.get("step_over_floor")
        mib = r.get("tensor_bytes_peak")
        pmib = p.get("peak_bytes") if p else None
        target, met = "", ""
        c, dev, m = key
        if dev == "cuda" and c == "seed_demo" and m == "strict":
            target, met = "<= 0.020 ms", ms <= 0.020
        elif dev == "cuda" and c == "layer1k" and m == "strict":
            target, met = ">= 10x PEFT", ratio is not None and ratio >= 10
        elif dev == "cuda" and c == "mlp4x4k" and m == "strict":
            mem_ok = pmib is not None and mib is not None and mib <= pmib
            target = "<= 1.05 floor; mem <= PEFT"
            met = f"{'yes' if over is not None and over <= 1.05 else 'no'}; {'yes' if mem_ok else 'no'}"
        elif dev == "cuda" and c == "mlp4x4k" and m == "tf32":
            target, met = ">= 5x PEFT fp32", ratio32 is not None and ratio32 >= 5
        elif dev == "cpu" and c == "seed_demo":
            target, met = ">= 100x PEFT", ratio is not None and ratio >= 100
        elif dev == "cpu" and c in ("layer1k", "mlp4x2k"):
            target, met = ">= 1x PEFT", ratio is not None and ratio >= 1
        if isinstance(met, bool):
            met = "yes" if met else "no"
        lines.append("| " + " | ".join([
            c, dev, m, str(r.get("threads", "")) if dev == "cpu" else "", fmt(ms), fmt(r.get("floor_all_ms")),
            fmt(over, 3), fmt(r.get("floor_ms")), fmt(over_large, 3), fmt(r.get("achieved_tflops"), 3), fmt(p["step_ms"]) if p else "-",
            fmt(ratio, 3), fmt(ratio32, 3) if m != "strict" else "", fmt(mib / 2**20 if mib else None),
            fmt(pmib / 2**20 if pmib else None), target, met,
            " ".join(fmt(x) for x in r["rounds_ms"]), " ".join(fmt(x) for x in p["rounds_ms"]) if p else "-"]) + " |")
    text = "\n".join(lines)
    print(text)
    if a.md:
        with open(a.md, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
