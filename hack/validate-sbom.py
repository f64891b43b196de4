#!/usr/bin/env python3
"""Checks the release SBOM (hack/release.sh) with CycloneDX's own Python library:
the document validates strictly against the JSON schema of its specVersion,
and every component it lists is a package of Cargo.lock at that version (an
independent record of what the build uses); dev-dependencies are not in it.

Usage: validate-sbom.py SBOM.cdx.json Cargo.lock
"""
import json
import sys
import tomllib

from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

sbom_path, lock_path = sys.argv[1:3]
text = open(sbom_path, encoding="utf-8").read()
sbom = json.loads(text)
version = SchemaVersion.from_version(sbom["specVersion"])
errors = JsonStrictValidator(version).validate_str(text)
if errors:
    sys.exit(f"{sbom_path}: not valid CycloneDX {sbom['specVersion']}: {errors}")

locked = {(p["name"], p["version"]) for p in tomllib.load(open(lock_path, "rb"))["package"]}
main = sbom["metadata"]["component"]
components = sbom.get("components", [])
unknown = [f"{c['name']}@{c['version']}" for c in components if (c["name"], c["version"]) not in locked]
if unknown:
    sys.exit(f"{sbom_path}: components not in Cargo.lock: {unknown}")
names = {c["name"] for c in components}
# A dev-dependency (tests only) must not be in the binary's SBOM; runtime ones must.
for dev in ("standardwebhooks", "rcgen", "tempfile"):
    if dev in names:
        sys.exit(f"{sbom_path}: lists the dev-dependency {dev}")
for runtime in ("kube", "tokio", "rustls", "axum"):
    if runtime not in names:
        sys.exit(f"{sbom_path}: does not list the dependency {runtime}")
print(
    f"{sbom_path}: valid CycloneDX {sbom['specVersion']}; {main['name']} {main.get('version')}, "
    f"{len(components)} components, each in Cargo.lock"
)
