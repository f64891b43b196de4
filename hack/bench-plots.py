"""Plots of docs/benchmarks/results.json, drawn by `hack/bench-results.py plots`
(`make bench-readme`). Deterministic: pinned libraries (hack/bench-requirements.txt),
matplotlib's own fonts, no dates or tool versions in the files, a fixed SVG id salt.

  controller-scale.svg/.png  controller (and ingress) RSS and time to Ready against
                             the number of instances
  latency.svg/.png           latency percentiles against the load they were measured under
  peer-cpu.svg/.png          CPU per webhook beside Knative's GitHubSource adapter,
                             including the API server and etcd

Every point is the median of its rounds; the bars span the rounds' minimum and maximum.
"""
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

matplotlib.rcParams.update({
    "svg.hashsalt": "dropbox-operator-bench",
    "svg.fonttype": "path",
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "figure.dpi": 100,
    "axes.grid": True,
    "grid.alpha": 0.3,
})
SVG_META = {"Date": None, "Creator": None, "Format": None, "Type": None}
PNG_META = {"Software": None}


def med(values):
    return statistics.median(values) if values else None


def err(values):
    """(median - min, max - median) for an error bar."""
    m = med(values)
    return (m - min(values), max(values) - m)


def save(fig, out, name):
    written = []
    for ext, meta in (("svg", SVG_META), ("png", PNG_META)):
        path = out / f"{name}.{ext}"
        fig.savefig(path, format=ext, metadata=meta, bbox_inches="tight")
        written.append(path)
    plt.close(fig)
    return written


def errorbar(ax, xs, series, **kw):
    pts = [(x, v) for x, v in zip(xs, series) if v]
    if not pts:
        return
    x = [p[0] for p in pts]
    y = [med(p[1]) for p in pts]
    e = [err(p[1]) for p in pts]
    ax.errorbar(x, y, yerr=[[a for a, _ in e], [b for _, b in e]], capsize=3, marker="o", **kw)


def controller_scale(results, out):
    rows = []
    for name, s in results["sections"].items():
        d = s.get("data", {})
        if name.startswith("controller") and d.get("instances"):
            rows.append(d)
    if not rows:
        return []
    rows.sort(key=lambda d: d["instances"])
    xs = [d["instances"] for d in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    errorbar(left, xs, [d.get("controller_rss_mib") for d in rows], label="controller")
    errorbar(left, xs, [d.get("ingress_rss_mib") for d in rows], label="ingress (events on)")
    left.axhline(80, color="gray", linestyle="--", linewidth=1, label="target 80 MiB")
    left.set_xscale("log")
    left.set_xlabel("instances")
    left.set_ylabel("RSS (MiB)")
    left.set_title("memory")
    left.legend()
    errorbar(right, xs, [d.get("controller_ready_s") for d in rows], label="controller")
    errorbar(right, xs, [d.get("plain_ready_s") for d in rows], label="fair plain loop")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("instances")
    right.set_ylabel("seconds until all Ready")
    right.set_title("time to Ready")
    right.legend()
    fig.suptitle("controller at scale (median of rounds; bars: min-max)")
    return save(fig, out, "controller-scale")


def latency(results, out):
    rows = []
    for s in results["sections"].values():
        for lat in s.get("data", {}).get("latencies", []):
            rows.append(lat)
    for s in results["sections"].values():
        for row in s.get("data", {}).get("rows", []):
            for side, label in (("ours", "ingress end to end"), ("peer", "Knative adapter end to end")):
                lat = row.get("latency", {}).get(side)
                if lat:
                    rows.append({"name": label, "load": f"{row['in_flight']} in flight", **lat})
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(10, 4.5))
    labels = [f"{r['name']}\n({r['load']})" for r in rows]
    xs = list(range(len(rows)))
    for key, marker in (("p50", "o"), ("p90", "s"), ("p99", "^"), ("p999", "v")):
        pts = [(x, r.get(key)) for x, r in zip(xs, rows)]
        if not any(v for _, v in pts):
            continue
        errorbar(ax, [x for x, _ in pts], [v for _, v in pts], label=key.replace("p999", "p99.9"),
                 linestyle="none")
    ax.axhline(2, color="gray", linestyle="--", linewidth=1, label="ack p99 target 2 ms")
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms")
    ax.set_title("latency percentiles by load (median of rounds; bars: min-max)")
    ax.legend(fontsize=7)
    return save(fig, out, "latency")


def peer_cpu(results, out):
    s = results["sections"].get("peer")
    rows = (s or {}).get("data", {}).get("rows", [])
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(8, 4))
    labels, x = [], 0
    colors = {}
    seen = set()
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row in rows:
        for side, name in (("ours", "ingress"), ("peer", "Knative adapter")):
            parts = row.get(side, {}).get("cpu_us", {})
            bottom = 0.0
            for proc, values in parts.items():
                value = med(values)
                if value is None:
                    continue
                color = colors.setdefault(proc, palette[len(colors) % len(palette)])
                ax.bar(x, value, bottom=bottom, color=color, label=None if proc in seen else proc)
                seen.add(proc)
                bottom += value
            total = row.get(side, {}).get("total_us")
            if total:
                ax.errorbar([x], [med(total)], yerr=[[err(total)[0]], [err(total)[1]]], color="black",
                            capsize=3)
            labels.append(f"{name}\n{row['in_flight']} in flight")
            x += 1
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("CPU µs per webhook")
    version = s.get("data", {}).get("peer", {}).get("version", "")
    ax.set_title(f"CPU per webhook, end to end (adapter: {str(version)[:40]}; bar: min-max of totals)",
                 fontsize=9)
    return save(fig, out, "peer-cpu")


def draw(results, out):
    written = []
    for plot in (controller_scale, latency, peer_cpu):
        written += plot(results, out)
    return written
