//go:build tools

// Package tools pins promtool, whose `test rules` runs the PrometheusRule's
// unit tests.
package tools

import _ "github.com/prometheus/prometheus/cmd/promtool"
