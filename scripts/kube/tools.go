//go:build tools

// Package tools pins the control-plane programs this module builds: Kubernetes' own
// commands from k8s.io/kubernetes, built with go build ./... of their import paths.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
