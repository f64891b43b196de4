#!/usr/bin/env python3
"""Benchmark figures -> results.json -> README's performance table.

  hack/bench-results.py collect   merge target/bench/*.json (written by `make bench`)
                                  into target/bench/results.json and copy it to
                                  docs/benchmarks/results.json (committed)
  hack/bench-results.py readme    regenerate README's table from docs/benchmarks/results.json
  hack/bench-results.py check     fail when README's table is not the one results.json gives

The table sits between the markers `<!-- bench:begin -->` and `<!-- bench:end -->`.
"""
import json
import pathlib
import subprocess
import sys
import datetime

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "target" / "bench"
COMMITTED = ROOT / "docs" / "benchmarks" / "results.json"
README = ROOT / "README.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
# Benchmarks in table order; a missing one is left out of the table.
ORDER = ["controller", "controller-10000", "ingress", "longpoll", "peer"]


def git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def collect():
    parts = {}
    for path in sorted(BENCH.glob("*.json")):
        if path.name == "results.json":
            continue
        doc = json.loads(path.read_text())
        parts[doc.get("bench", path.stem)] = doc["figures"]
    if not parts:
        sys.exit("no benchmark output in target/bench: run `make bench` first")
    results = {
        "generated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git("rev-parse", "HEAD"),
        # The code the figures were measured on: a results.json whose tree differs
        # from the current one is stale (`check` says so).
        "code_tree": code_tree(),
        "dirty": bool(git("status", "--porcelain", "--", "src", "Cargo.lock", "tests/bench.rs")),
        "benchmarks": {name: parts[name] for name in ORDER if name in parts}
        | {name: figs for name, figs in parts.items() if name not in ORDER},
    }
    text = json.dumps(results, indent=2) + "\n"
    (BENCH / "results.json").write_text(text)
    COMMITTED.parent.mkdir(parents=True, exist_ok=True)
    COMMITTED.write_text(text)
    print(f"wrote {BENCH / 'results.json'} and {COMMITTED.relative_to(ROOT)}")


def code_tree():
    return git("rev-parse", "HEAD:src") + " " + git("rev-parse", "HEAD:Cargo.lock")


def fmt(value, unit):
    if unit in ("x",):
        return f"{value:.2f}×"
    if unit == "writes":
        return f"{abs(value) if value == 0 else value:g}"
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}"
    return f"{value:.2f} {unit}"


def table(results):
    lines = [
        f"Measured at commit `{results['commit'][:12]}` on {results['generated'][:10]} "
        "(`make bench`, then `make bench-readme`; raw figures in "
        "[docs/benchmarks/results.json](docs/benchmarks/results.json)).",
        "",
        "| what | measured | target | met | how |",
        "|---|---|---|---|---|",
    ]
    for figures in results["benchmarks"].values():
        for f in figures:
            target = f["target"] or "—"
            if f["target"] and f["unit"] not in ("x", "writes"):
                target = f"{f['target']} {f['unit']}"
            met = {True: "yes", False: "**no**", None: "—"}[f["met"]]
            lines.append(
                f"| {f['what']} | **{fmt(f['value'], f['unit'])}** | {target} | {met} | {f['detail']} |"
            )
    return "\n".join(lines) + "\n"


def rendered_readme():
    if not COMMITTED.exists():
        sys.exit(f"{COMMITTED.relative_to(ROOT)} is missing: run `make bench` and `make bench-readme`")
    results = json.loads(COMMITTED.read_text())
    text = README.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"README.md has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return text, head + BEGIN + "\n" + table(results) + END + tail, results


def main():
    cmd = sys.argv[1] if len(sys.argv) > 1 else "check"
    if cmd == "collect":
        collect()
    elif cmd == "readme":
        _, new, _ = rendered_readme()
        README.write_text(new)
        print("README.md performance table regenerated")
    elif cmd == "check":
        old, new, results = rendered_readme()
        if old != new:
            sys.exit("README's performance table differs from docs/benchmarks/results.json: run `make bench-readme`")
        if results.get("code_tree") != code_tree() or results.get("dirty"):
            print("note: docs/benchmarks/results.json was measured on other code than HEAD's src/ "
                  "and Cargo.lock: rerun `make bench` before a release")
        print("README's performance table matches docs/benchmarks/results.json")
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
