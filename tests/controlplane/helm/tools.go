//go:build tools

// Package tools pins the helm command the chart tests are built from.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
