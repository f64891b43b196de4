//go:build tools

// Package tools pins the container runtime of the e2e node: containerd, its
// runc shim and ctr (which imports images without a registry).
package tools

import (
	_ "github.com/containerd/containerd/v2/cmd/containerd"
	_ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
	_ "github.com/containerd/containerd/v2/cmd/ctr"
)
