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
            r.setdefault("layer", doc.get("layer", "lora"))
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


def dora_table(rel_all, pef_all):
    """relora's DoRA against its own LoRA and against PEFT's DoRA (LoraConfig(use_dora=True)),
    with issue 14's targets: DoRA <= 1.15x our LoRA on layer4k, mlp4x4k and llm_mlp; >= 10x PEFT
    DoRA on layer1k; >= 1.2x PEFT DoRA on mlp4x4k strict; peak memory <= 0.6x PEFT DoRA's there."""
    ours = {(r["case"], r["backend"], r["math"], r["layer"]): r for r in rel_all}
    theirs = {(r["case"], r["device"], r["math"], r.get("mode", "peft")): r for r in pef_all}
    rows = sorted({k[:3] for k in ours if k[3] == "dora"})
    if not rows:
        return ""
    lines = ["| case | backend | math | relora LoRA ms | relora DoRA ms | DoRA/LoRA | PEFT DoRA ms | PEFT DoRA/relora DoRA "
             "| relora DoRA MiB | PEFT DoRA MiB | MiB ratio | targets | met | relora DoRA rounds ms | PEFT DoRA rounds ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c, dev, m in rows:
        d = ours[(c, dev, m, "dora")]
        l = ours.get((c, dev, m, "lora"))
        p = theirs.get((c, dev, m, "peft_dora"))
        own = d["step_ms"] / l["step_ms"] if l else None
        speed = p["step_ms"] / d["step_ms"] if p else None
        mib = d.get("tensor_bytes_peak")
        pmib = p.get("peak_bytes") if p else None
        mem = mib / pmib if mib and pmib else None
        targets, met = [], []
        if c in ("layer4k", "mlp4x4k", "llm_mlp"):
            targets.append("<= 1.15x LoRA")
            met.append("yes" if own is not None and own <= 1.15 else "no")
        if dev == "cuda" and c == "layer1k" and m == "strict":
            targets.append(">= 10x PEFT")
            met.append("yes" if speed is not None and speed >= 10 else "no")
        if dev == "cuda" and c == "mlp4x4k" and m == "strict":
            targets += [">= 1.2x PEFT", "mem <= 0.6x PEFT"]
            met += ["yes" if speed is not None and speed >= 1.2 else "no",
                    "yes" if mem is not None and mem <= 0.6 else "no"]
        lines.append("| " + " | ".join([
            c, dev, m, fmt(l["step_ms"]) if l else "-", fmt(d["step_ms"]), fmt(own, 3), fmt(p["step_ms"]) if p else "-",
            fmt(speed, 3), fmt(mib / 2**20 if mib else None), fmt(pmib / 2**20 if pmib else None), fmt(mem, 3),
            "; ".join(targets), "; ".join(met), " ".join(fmt(x) for x in d["rounds_ms"]),
            " ".join(fmt(x) for x in p["rounds_ms"]) if p else "-"]) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--relora", nargs="*", default=[])
    ap.add_argument("--peft", nargs="*", default=[])
    ap.add_argument("--md", default="")
    a = ap.parse_args()
    rel_all = median_rows([r for r in load(a.relora, "results") if "skipped" not in r],
                          lambda r: (r["case"], r["backend"], r["math"], r["layer"]))
    pef_all = median_rows([r for r in load(a.peft, "steps") if r.get("mode", "peft") in ("peft", "peft_dora")],
                          lambda r: (r["case"], r["device"], r["math"], r.get("mode", "peft")))
    rel = [r for r in rel_all if r["layer"] == "lora"]
    peft_of = {(r["case"], r["device"], r["math"]): r for r in pef_all if r.get("mode", "peft") == "peft"}

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
    dora = dora_table(rel_all, pef_all)
    text = "\n".join(lines) + ("\n\n" + dora if dora else "")
    print(text)
    if a.md:
        with open(a.md, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
