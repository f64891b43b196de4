#!/usr/bin/env python3
"""Benchmark sections -> results.json -> docs/performance.md's table and plots.

  hack/bench-results.py stamp      print where a section is being measured: commit,
                                   source digest, time (the benchmarks call this)
  hack/bench-results.py collect [--keep NAME,...]
                                   merge the sections in target/bench/*.json (written
                                   by `make bench*`) into docs/benchmarks/results.json.
                                   Refuses a section measured on another source tree
                                   than the current one; --keep NAME keeps that
                                   section anyway and records that it was kept so
  hack/bench-results.py readme     regenerate docs/performance.md's table from docs/benchmarks/results.json
  hack/bench-results.py plots      draw docs/benchmarks/*.svg and *.png from results.json
                                   (needs matplotlib: `make bench-readme` uses a venv)
  hack/bench-results.py check      fail when docs/performance.md's table or the plots are not the
                                   ones results.json gives (`make lint`)

The source digest of a tree is the SHA-256 of `sha256sum`'s output over the
files git tracks in src/, Cargo.toml and Cargo.lock, read from the work tree:

  git ls-files src Cargo.toml Cargo.lock | xargs sha256sum | sha256sum

The table sits between the markers `<!-- bench:begin -->` and `<!-- bench:end -->`.
"""
import datetime
import hashlib
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "target" / "bench"
DOCS = ROOT / "docs" / "benchmarks"
COMMITTED = DOCS / "results.json"
PLOTS_MANIFEST = DOCS / "plots.json"
PLOTTER = ROOT / "hack" / "bench-plots.py"
REQUIREMENTS = ROOT / "hack" / "bench-requirements.txt"
TABLE_DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
# What the figures are measured on, and what measures them.
SOURCE = ["src", "Cargo.toml", "Cargo.lock"]
HARNESS = ["tests/bench.rs", "tests/bench_peer.rs", "tests/support", "hack/bench-results.py",
           "hack/bench-peer.sh", "Makefile"]
# Sections in table order; others follow by name.
ORDER = ["controller", "controller-10000", "controller-30000", "ingress", "longpoll", "peer"]
MIN_ROUNDS = 3


def git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def digest(paths):
    files = [f for f in git("ls-files", "-z", "--", *paths).split("\0") if f]
    lines = []
    for f in files:
        path = ROOT / f
        if path.is_file():
            lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {f}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def stamp():
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--", *SOURCE)),
        "source_digest": digest(SOURCE),
        "harness_digest": digest(HARNESS),
        "measured_at": now(),
    }


def load_results():
    if not COMMITTED.exists():
        return {"sections": {}}
    return json.loads(COMMITTED.read_text())


def ordered(sections):
    names = [n for n in ORDER if n in sections] + sorted(n for n in sections if n not in ORDER)
    return {n: sections[n] for n in names}


def collect(keep):
    results = load_results()
    sections = dict(results.get("sections", {}))
    fresh = []
    for path in sorted(BENCH.glob("*.json")):
        if path.name == "results.json":
            continue
        doc = json.loads(path.read_text())
        if "provenance" not in doc or "bench" not in doc:
            print(f"skipping {path.relative_to(ROOT)}: not a stamped section (from an older harness?)")
            continue
        name = doc.pop("bench")
        sections[name] = doc
        fresh.append(name)
    if not fresh and not sections:
        sys.exit("no benchmark output in target/bench: run `make bench` first")
    current = digest(SOURCE)
    refused = []
    for name, section in sections.items():
        p = section.get("provenance", {})
        problems = []
        if p.get("source_digest") != current:
            problems.append(
                f"measured on commit {str(p.get('commit'))[:12]} with source digest "
                f"{str(p.get('source_digest'))[:12]}, the tree now has {current[:12]}")
        if p.get("source_changed_during_run"):
            problems.append("the source tree changed while it was measured")
        if not problems:
            section.pop("kept", None)
        elif name in keep:
            section["kept"] = {"by": "hack/bench-results.py collect --keep", "at": now(),
                               "source_digest_at_collect": current, "because": problems}
        else:
            refused.append(f"  {name}: " + "; ".join(problems))
    if refused:
        sys.exit("refusing sections not measured on the current source tree:\n" + "\n".join(refused)
                 + "\nrerun their benchmarks, or keep them knowingly with "
                 "`hack/bench-results.py collect --keep NAME[,NAME]` (recorded in results.json)")
    out = {
        "generated": now(),
        "commit": git("rev-parse", "HEAD"),
        "source_digest": current,
        "sections": ordered(sections),
    }
    text = json.dumps(out, indent=2) + "\n"
    BENCH.mkdir(parents=True, exist_ok=True)
    (BENCH / "results.json").write_text(text)
    DOCS.mkdir(parents=True, exist_ok=True)
    COMMITTED.write_text(text)
    print(f"collected {', '.join(fresh) or 'nothing new'} into {COMMITTED.relative_to(ROOT)}"
          + (f" (kept from another tree: {', '.join(sorted(keep & set(sections)))})" if keep else ""))


def fmt(value, unit):
    if value is None:
        return "—"
    if unit == "x":
        return f"{value:.2f}×"
    if unit in ("writes", "calls", "reads"):
        return f"{abs(value) if value == 0 else value:.2f}".rstrip("0").rstrip(".")
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}"
    return f"{value:.2f} {unit}"


def rounds_cell(f):
    rounds = f.get("rounds") or []
    if not rounds:
        return "not kept"
    lo, hi = min(rounds), max(rounds)
    n = len(rounds)
    count = f"**{n}**" if n < MIN_ROUNDS else f"{n}"
    return f"{count}: {fmt(lo, f['unit'])} – {fmt(hi, f['unit'])}"


def table(results):
    lines = [
        f"Collected on {results['generated'][:10]} at commit `{results['commit'][:12]}` "
        "(`make bench`, `make bench-scale`, `make bench-peer`, then `make bench-readme`; raw "
        "figures in [docs/benchmarks/results.json](benchmarks/results.json)). "
        "Each section was measured on its own source tree:",
        "",
        "| section | commit | measured | source digest | note |",
        "|---|---|---|---|---|",
    ]
    for name, s in results["sections"].items():
        p = s.get("provenance", {})
        notes = []
        if p.get("dirty"):
            notes.append("uncommitted changes (in the digest)")
        if s.get("kept"):
            notes.append("**kept from another source tree** (" + "; ".join(s["kept"]["because"]) + ")")
        if p.get("legacy"):
            notes.append(p["legacy"])
        digest_cell = f"`{p['source_digest'][:12]}`" if p.get("source_digest") else "—"
        lines.append(f"| {name} | `{str(p.get('commit', ''))[:12]}` | {str(p.get('measured_at', ''))[:16]} "
                     f"| {digest_cell} | {'; '.join(notes) or '—'} |")
    lines += [
        "",
        "| what | measured (median) | rounds: min – max | target | met | load | how |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in results["sections"].values():
        for f in s["figures"]:
            target = f["target"] or "—"
            if f["target"] and f["unit"] not in ("x", "writes", "calls", "reads"):
                target = f"{f['target']} {f['unit']}"
            met = {True: "yes", False: "**no**", None: "—"}[f["met"]]
            lines.append(
                f"| {f['what']} | **{fmt(f['value'], f['unit'])}** | {rounds_cell(f)} | {target} | {met} "
                f"| {f.get('load') or '—'} | {f['detail']} |"
            )
    return "\n".join(lines) + "\n"


def rendered_readme():
    if not COMMITTED.exists():
        sys.exit(f"{COMMITTED.relative_to(ROOT)} is missing: run `make bench` and `make bench-readme`")
    results = json.loads(COMMITTED.read_text())
    text = TABLE_DOC.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"docs/performance.md has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return text, head + BEGIN + "\n" + table(results) + END + tail, results


def plot_inputs():
    """What the plots are drawn from: results.json, the plotting code and its pinned libraries."""
    h = hashlib.sha256()
    for path in (COMMITTED, PLOTTER, REQUIREMENTS):
        h.update(hashlib.sha256(path.read_bytes()).hexdigest().encode() + b"  " +
                 str(path.relative_to(ROOT)).encode() + b"\n")
    return h.hexdigest()


def plots():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_plots", PLOTTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = json.loads(COMMITTED.read_text())
    written = module.draw(results, DOCS)
    manifest = {
        "inputs": plot_inputs(),
        "drawn_from": ["docs/benchmarks/results.json", "hack/bench-plots.py", "hack/bench-requirements.txt"],
        "files": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(written)},
    }
    PLOTS_MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")
    print("plots drawn: " + ", ".join(p.name for p in sorted(written)))


def check_plots():
    if not PLOTS_MANIFEST.exists():
        return [f"{PLOTS_MANIFEST.relative_to(ROOT)} is missing"]
    manifest = json.loads(PLOTS_MANIFEST.read_text())
    problems = []
    if manifest.get("inputs") != plot_inputs():
        problems.append("results.json, hack/bench-plots.py or hack/bench-requirements.txt changed "
                        "since the plots were drawn")
    for name, sha in manifest.get("files", {}).items():
        path = DOCS / name
        if not path.exists():
            problems.append(f"docs/benchmarks/{name} is missing")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != sha:
            problems.append(f"docs/benchmarks/{name} is not the drawn one")
    return problems


def main():
    args = sys.argv[1:]
    cmd = args[0] if args else "check"
    if cmd == "stamp":
        print(json.dumps(stamp()))
    elif cmd == "collect":
        keep = set()
        rest = args[1:]
        while rest:
            arg = rest.pop(0)
            if arg == "--keep" and rest:
                keep |= {k for k in rest.pop(0).split(",") if k}
            elif arg.startswith("--keep="):
                keep |= {k for k in arg.split("=", 1)[1].split(",") if k}
            else:
                sys.exit(__doc__)
        collect(keep)
    elif cmd == "readme":
        _, new, _ = rendered_readme()
        TABLE_DOC.write_text(new)
        print("docs/performance.md table regenerated")
    elif cmd == "plots":
        plots()
    elif cmd == "check":
        old, new, results = rendered_readme()
        problems = []
        if old != new:
            problems.append("docs/performance.md's table differs from docs/benchmarks/results.json")
        problems += check_plots()
        if problems:
            sys.exit("\n".join(problems) + "\nrun `make bench-readme`")
        current = digest(SOURCE)
        stale = [n for n, s in results["sections"].items()
                 if s.get("provenance", {}).get("source_digest") != current]
        if stale:
            print("note: these sections of docs/benchmarks/results.json were measured on another "
                  f"source tree than this one: {', '.join(stale)}; rerun them before a release")
        print("docs/performance.md's table and plots match docs/benchmarks/results.json")
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
