// Command report reads the JUnit file of a run of the NetworkPolicy specs
// (ginkgo's --junit-report) and prints one line per spec, PASS, FAIL or
// SKIP with the reason, and the summary
//
//	conformance: N of M passed, K skipped (why)
//
// where M counts the specs that ran and K those the focus selected but
// that did not run. It exits 1 when a spec or the suite's setup failed,
// or when nothing ran: a run that proves nothing is not a pass.
//
// Usage: report -junit FILE [-skip-reason TEXT]
package main

import (
	"encoding/xml"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
)

// The parts of ginkgo's JUnit report read here.
type testSuites struct {
	Suites []testSuite `xml:"testsuite"`
}

type testSuite struct {
	Cases []testCase `xml:"testcase"`
}

type testCase struct {
	Name    string   `xml:"name,attr"`
	Status  string   `xml:"status,attr"`
	Time    float64  `xml:"time,attr"`
	Skipped *message `xml:"skipped"`
	Failure *message `xml:"failure"`
	Error   *message `xml:"error"`
}

type message struct {
	Message string `xml:"message,attr"`
}

func main() {
	junit := flag.String("junit", "", "ginkgo's JUnit report")
	skipReason := flag.String("skip-reason", "", "why specs were skipped by the command line (for the summary)")
	flag.Parse()
	if *junit == "" || flag.NArg() > 0 {
		fmt.Fprintln(os.Stderr, "usage: report -junit FILE [-skip-reason TEXT]")
		os.Exit(2)
	}
	ok, err := report(*junit, *skipReason, os.Stdout)
	if err != nil {
		fmt.Fprintln(os.Stderr, "report:", err)
		os.Exit(2)
	}
	if !ok {
		os.Exit(1)
	}
}

// report prints the per-spec lines and the summary; ok is false when
// anything failed or nothing ran.
func report(path, skipReason string, w io.Writer) (ok bool, err error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return false, err
	}
	var r testSuites
	if err := xml.Unmarshal(b, &r); err != nil {
		return false, fmt.Errorf("%s: %w", path, err)
	}
	var passed, failed, skipped []testCase
	setupFailed := false
	for _, s := range r.Suites {
		for _, c := range s.Cases {
			bad := c.Failure != nil || c.Error != nil || c.Status == "failed" || c.Status == "panicked" || c.Status == "timedout" || c.Status == "interrupted" || c.Status == "aborted"
			// Suite nodes ([SynchronizedBeforeSuite], [ReportAfterSuite]...)
			// are not specs, but their failure fails the run.
			if strings.HasPrefix(c.Name, "[") && strings.Contains(c.Name, "Suite]") {
				if bad {
					setupFailed = true
					fmt.Fprintf(w, "FAIL  %s%s\n", c.Name, firstLine(c.Failure, c.Error))
				}
				continue
			}
			switch {
			case bad:
				failed = append(failed, c)
			case c.Skipped != nil || c.Status == "skipped" || c.Status == "pending":
				// Specs the focus did not select are not the suite's: only
				// [Feature:NetworkPolicy] ones count.
				if strings.Contains(c.Name, "[Feature:NetworkPolicy]") {
					skipped = append(skipped, c)
				}
			default:
				passed = append(passed, c)
			}
		}
	}
	byName := func(cs []testCase) {
		sort.Slice(cs, func(i, j int) bool { return cs[i].Name < cs[j].Name })
	}
	byName(passed)
	byName(failed)
	byName(skipped)
	for _, c := range passed {
		fmt.Fprintf(w, "PASS  %s (%.0fs)\n", c.Name, c.Time)
	}
	for _, c := range skipped {
		// A spec that skipped itself says why after "skipped - "; one the
		// command line skipped says only "skipped".
		why := skipReason
		if c.Skipped != nil {
			if _, own, ok := strings.Cut(c.Skipped.Message, "skipped - "); ok {
				why = own
			}
		}
		fmt.Fprintf(w, "SKIP  %s (%s)\n", c.Name, oneLine(why))
	}
	for _, c := range failed {
		fmt.Fprintf(w, "FAIL  %s (%.0fs)%s\n", c.Name, c.Time, firstLine(c.Failure, c.Error))
	}
	ran := len(passed) + len(failed)
	why := ""
	if len(skipped) > 0 {
		why = fmt.Sprintf(" (%s)", oneLine(skipReason))
	}
	fmt.Fprintf(w, "conformance: %d of %d passed, %d skipped%s\n", len(passed), ran, len(skipped), why)
	if setupFailed {
		fmt.Fprintln(w, "conformance: the suite's setup failed")
	}
	if ran == 0 {
		return false, errors.New("no spec ran")
	}
	return len(failed) == 0 && !setupFailed, nil
}

// firstLine is the first line of a failure's message, after a colon.
func firstLine(ms ...*message) string {
	for _, m := range ms {
		if m != nil && m.Message != "" {
			return ": " + oneLine(m.Message)
		}
	}
	return ""
}

func oneLine(s string) string {
	s, _, _ = strings.Cut(strings.TrimSpace(s), "\n")
	if len(s) > 200 {
		s = s[:200] + "..."
	}
	return s
}
