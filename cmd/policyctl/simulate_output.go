package main

import (
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"text/tabwriter"

	"github.com/idcni/idcni/policy/simulate"
)

// writeSimulateJSON writes results as one JSON array.
func writeSimulateJSON(w io.Writer, results []simulate.Result) error {
	if results == nil {
		results = []simulate.Result{} // "[]", not "null", for an empty answer
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(results); err != nil {
		return fmt.Errorf("write JSON: %w", err)
	}
	return nil
}

// writeSimulateTable writes one matrix per protocol and port (rows: from, columns:
// to; "ok" allowed, "DENY" denied, "-" not probed), then the reason for
// every denial.
func writeSimulateTable(w io.Writer, results []simulate.Result) error {
	if len(results) == 0 {
		_, err := fmt.Fprintln(w, "nothing to probe: no pod pair with a port (give pods containerPorts, or pass --port)")
		return err
	}
	type pp struct {
		proto string
		port  int
	}
	var probes []pp
	var pods []string
	cell := map[pp]map[[2]string]bool{}
	for _, r := range results {
		k := pp{r.Protocol, r.Port}
		if cell[k] == nil {
			cell[k] = map[[2]string]bool{}
			probes = append(probes, k)
		}
		cell[k][[2]string{r.From, r.To}] = r.Allowed
		pods = append(pods, r.From, r.To)
	}
	slices.SortFunc(probes, func(a, b pp) int { return cmp.Or(cmp.Compare(a.proto, b.proto), cmp.Compare(a.port, b.port)) })
	slices.Sort(pods)
	pods = slices.Compact(pods)

	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for i, k := range probes {
		if i > 0 {
			fmt.Fprintln(tw)
		}
		fmt.Fprintf(tw, "%s/%d\n", k.proto, k.port)
		fmt.Fprint(tw, "from \\ to")
		for _, to := range pods {
			fmt.Fprintf(tw, "\t%s", to)
		}
		fmt.Fprintln(tw)
		for _, from := range pods {
			fmt.Fprint(tw, from)
			for _, to := range pods {
				v := "-"
				if allowed, ok := cell[k][[2]string{from, to}]; ok {
					v = "DENY"
					if allowed {
						v = "ok"
					}
				}
				fmt.Fprintf(tw, "\t%s", v)
			}
			fmt.Fprintln(tw)
		}
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write table: %w", err)
	}
	allowed, denied := 0, 0
	for _, r := range results {
		if r.Allowed {
			allowed++
		} else {
			denied++
		}
	}
	fmt.Fprintf(w, "\n%d probes: %d allowed, %d denied\n", len(results), allowed, denied)
	if denied > 0 {
		fmt.Fprintln(w, "\ndenied:")
		for _, r := range results {
			if !r.Allowed {
				fmt.Fprintf(w, "  %s -> %s %s/%d: %s\n", r.From, r.To, r.Protocol, r.Port, r.Reason)
			}
		}
	}
	return nil
}
