//go:build tools

// Package tools pins krew's manifest validator, the check krew-index runs on
// every plugin manifest.
package tools

import _ "sigs.k8s.io/krew/cmd/validate-krew-manifest"

// krew itself (installed as kubectl-krew): the validator installs each
// platform's archive with `kubectl krew install --manifest`.
import _ "sigs.k8s.io/krew/cmd/krew"
