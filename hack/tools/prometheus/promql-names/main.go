// Command promql-names prints the metric names that PromQL expressions read,
// as Prometheus's own parser sees them (so a typo in a selector, a label
// matcher on __name__ or an expression that does not parse cannot hide).
//
// Input (stdin): a JSON object {"<where>": "<expr>", ...}.
// Output (stdout): a JSON object {"<where>": ["metric", ...], ...}, names sorted.
// An expression that does not parse, or a selector without a literal metric
// name, is an error naming <where> (exit 1).
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"sort"

	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"
)

func names(expr string) ([]string, error) {
	node, err := parser.NewParser(parser.Options{}).ParseExpr(expr)
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	var walkErr error
	parser.Inspect(node, func(n parser.Node, _ []parser.Node) error {
		vs, ok := n.(*parser.VectorSelector)
		if !ok {
			return nil
		}
		name := vs.Name
		if name == "" {
			for _, m := range vs.LabelMatchers {
				if m.Name == labels.MetricName && m.Type == labels.MatchEqual {
					name = m.Value
				}
			}
		}
		if name == "" {
			walkErr = fmt.Errorf("selector %s has no literal metric name", vs.String())
			return walkErr
		}
		seen[name] = true
		return nil
	})
	if walkErr != nil {
		return nil, walkErr
	}
	out := make([]string, 0, len(seen))
	for n := range seen {
		out = append(out, n)
	}
	sort.Strings(out)
	return out, nil
}

func main() {
	var in map[string]string
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintf(os.Stderr, "promql-names: reading stdin: %v\n", err)
		os.Exit(2)
	}
	out := map[string][]string{}
	failed := false
	for where, expr := range in {
		n, err := names(expr)
		if err != nil {
			fmt.Fprintf(os.Stderr, "promql-names: %s: %v\n  %s\n", where, err, expr)
			failed = true
			continue
		}
		out[where] = n
	}
	if failed {
		os.Exit(1)
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(out); err != nil {
		os.Exit(2)
	}
}
