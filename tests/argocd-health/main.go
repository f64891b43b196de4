// Command argocd-health prints the health of Kubernetes objects as Argo CD
// assesses it, with Argo CD's own health code (gitops-engine's pkg/health).
//
// It reads objects as JSON on standard input: one object, a List (what
// `kubectl get -o json` prints for several), or a stream of either. For each
// object it prints one JSON line:
//
//	{"kind":"HorizontalPodAutoscaler","namespace":"ops","name":"x","status":"Degraded","message":"..."}
//
// status is empty for kinds Argo CD has no built-in health check for (Argo CD
// then leaves them out of the application's health). tests/chart_argocd.rs
// runs it over the objects a Helm install created.
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/argoproj/gitops-engine/pkg/health"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

type verdict struct {
	Kind      string `json:"kind"`
	Namespace string `json:"namespace,omitempty"`
	Name      string `json:"name"`
	Status    string `json:"status"`
	Message   string `json:"message,omitempty"`
}

func assess(obj map[string]interface{}, out *json.Encoder) error {
	u := &unstructured.Unstructured{Object: obj}
	if strings.HasSuffix(u.GetKind(), "List") {
		items, _, err := unstructured.NestedSlice(obj, "items")
		if err != nil {
			return fmt.Errorf("%s: items: %w", u.GetKind(), err)
		}
		for _, item := range items {
			m, ok := item.(map[string]interface{})
			if !ok {
				return fmt.Errorf("%s: an item is not an object", u.GetKind())
			}
			if err := assess(m, out); err != nil {
				return err
			}
		}
		return nil
	}
	v := verdict{Kind: u.GetKind(), Namespace: u.GetNamespace(), Name: u.GetName()}
	h, err := health.GetResourceHealth(u, nil)
	if err != nil {
		v.Status, v.Message = string(health.HealthStatusUnknown), err.Error()
	} else if h != nil {
		v.Status, v.Message = string(h.Status), h.Message
	}
	return out.Encode(v)
}

func main() {
	in := json.NewDecoder(os.Stdin)
	out := json.NewEncoder(os.Stdout)
	for {
		var obj map[string]interface{}
		err := in.Decode(&obj)
		if errors.Is(err, io.EOF) {
			return
		}
		if err == nil {
			err = assess(obj, out)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "argocd-health:", err)
			os.Exit(1)
		}
	}
}
