#!/usr/bin/env bash
# Writes the Docker build context of the committed tree into DIR, the way
# `docker build .` sends it: the files of `git archive HEAD`, minus what
# .dockerignore excludes (Docker's rules: patterns in order, the last match
# wins, `!` re-includes, a pattern that matches a directory covers everything
# below it, `**` matches any number of directories).
#
# Usage: hack/docker-context.sh DIR    (DIR must not exist or be empty)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:?usage: hack/docker-context.sh DIR}
mkdir -p "$dir"
[[ -z $(ls -A "$dir") ]] || {
    echo "$dir is not empty" >&2
    exit 1
}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git archive --format=tar HEAD | tar -x -C "$tmp"
python3 - "$tmp" "$dir" .dockerignore <<'PY'
import fnmatch, os, re, shutil, sys

src, dst, ignore_file = sys.argv[1:4]
rules = []
for line in open(ignore_file):
    line = line.strip()
    if not line or line.startswith("#"):
        continue
    negate = line.startswith("!")
    pattern = os.path.normpath(line[1:] if negate else line).lstrip("/")
    # filepath.Match semantics plus `**`: `*` and `?` stay within a path element.
    regex = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            regex += ".*"
            i += 2
            if pattern.startswith("/", i):
                regex = regex[:-2] + "(.*/)?"
                i += 1
        elif pattern[i] == "*":
            regex += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            regex += "[^/]"
            i += 1
        else:
            regex += re.escape(pattern[i])
            i += 1
    rules.append((negate, re.compile(regex + "$")))

def excluded(path):
    """Docker's decision for one file: the last matching rule wins; a rule
    matches a path or any of its parent directories."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negate, regex in rules:
        if any(regex.match(p) for p in prefixes):
            result = not negate
    return result

kept = 0
for root, _, files in os.walk(src):
    for name in files:
        full = os.path.join(root, name)
        rel = os.path.relpath(full, src)
        if not excluded(rel):
            os.makedirs(os.path.join(dst, os.path.dirname(rel)), exist_ok=True)
            shutil.copy2(full, os.path.join(dst, rel))
            kept += 1
print(f"build context: {kept} files in {dst}", file=sys.stderr)
PY
