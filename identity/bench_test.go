package identity

import (
	"fmt"
	"os"
	"sync/atomic"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// benchSet returns the i-th of many distinct, realistically sized label sets:
// six pod labels (one of them churn), a namespace out of 200 with three
// labels. About 330 bytes encoded.
func benchSet(b testing.TB, i int) LabelSet {
	ns := fmt.Sprintf("namespace-%03d", i%200)
	set, err := FromPod(map[string]string{
		"app":                       fmt.Sprintf("service-%06d", i),
		"app.kubernetes.io/name":    fmt.Sprintf("service-%06d", i),
		"app.kubernetes.io/part-of": fmt.Sprintf("product-%03d", i%100),
		"tier":                      [...]string{"frontend", "backend", "data"}[i%3],
		"version":                   "v1.42.0",
		"pod-template-hash":         "5d8f7c9b4",
	}, ns, map[string]string{
		"kubernetes.io/metadata.name": ns,
		"team":                        fmt.Sprintf("team-%02d", i%40),
		"environment":                 "production",
	}, Options{})
	if err != nil {
		b.Fatal(err)
	}
	return set
}

func reportRate(b *testing.B, n int, unit string) {
	b.ReportMetric(float64(n)/b.Elapsed().Seconds(), unit)
}

func BenchmarkFromPod(b *testing.B) {
	for i := 0; b.Loop(); i++ {
		benchSet(b, i)
	}
}

// One new set per call, each its own transaction and disk sync: the cost of
// a pod with labels never seen before, when pods arrive one at a time.
func BenchmarkAllocateNew(b *testing.B) {
	a := open(b, statePath(b), Config{})
	for i := 0; b.Loop(); i++ {
		if _, err := a.Allocate(benchSet(b, i)); err != nil {
			b.Fatal(err)
		}
	}
	reportRate(b, b.N, "allocs/s")
}

// New sets from many goroutines at once: the group commit shares syncs.
func BenchmarkAllocateNewParallel(b *testing.B) {
	a := open(b, statePath(b), Config{})
	var next atomic.Int64
	b.SetParallelism(16)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := a.Allocate(benchSet(b, int(next.Add(1)))); err != nil {
				b.Error(err)
				return
			}
		}
	})
	reportRate(b, b.N, "allocs/s")
}

// New sets 1000 to a transaction, as on a first start with many pods.
func BenchmarkAllocateAllNew(b *testing.B) {
	const batch = 1000
	a := open(b, statePath(b), Config{})
	sets := make([]LabelSet, batch)
	n := 0
	for b.Loop() {
		b.StopTimer()
		for j := range sets {
			sets[j] = benchSet(b, n+j)
		}
		b.StartTimer()
		if _, err := a.AllocateAll(sets); err != nil {
			b.Fatal(err)
		}
		n += batch
	}
	reportRate(b, n, "allocs/s")
}

// filled returns an allocator holding n sets, and the sets.
func filled(b *testing.B, n int) (*Allocator, []LabelSet) {
	a := open(b, statePath(b), Config{})
	sets := make([]LabelSet, n)
	for i := range sets {
		sets[i] = benchSet(b, i)
	}
	for i := 0; i < n; i += 1000 {
		if _, err := a.AllocateAll(sets[i:min(i+1000, n)]); err != nil {
			b.Fatal(err)
		}
	}
	return a, sets
}

func BenchmarkLookupKnown(b *testing.B) {
	a, sets := filled(b, 100_000)
	for i := 0; b.Loop(); i++ {
		if _, ok := a.Lookup(sets[(i*7919)%len(sets)]); !ok {
			b.Fatal("known set not found")
		}
	}
	reportRate(b, b.N, "lookups/s")
}

func BenchmarkLookupKnownParallel(b *testing.B) {
	a, sets := filled(b, 100_000)
	var seed atomic.Int64
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := int(seed.Add(1)) * 50_000 // goroutines walk apart, sharing nothing
		for pb.Next() {
			i += 7919
			if _, ok := a.Lookup(sets[i%len(sets)]); !ok {
				b.Error("known set not found")
				return
			}
		}
	})
	reportRate(b, b.N, "lookups/s")
}

// Allocate of a set that has a user: answered from memory, no write.
func BenchmarkAllocateKnown(b *testing.B) {
	a, sets := filled(b, 10_000)
	for i, s := range sets {
		if _, err := a.Acquire(fmt.Sprint("ep", i), s); err != nil {
			b.Fatal(err)
		}
	}
	for i := 0; b.Loop(); i++ {
		if _, err := a.Allocate(sets[(i*7919)%len(sets)]); err != nil {
			b.Fatal(err)
		}
	}
	reportRate(b, b.N, "allocs/s")
}

// The state file holding 100,000 label sets (each with its idle record).
// bytes-file is what the file takes on disk (bbolt grows it in steps),
// bytes-used the part its pages fill.
func BenchmarkFileSize100k(b *testing.B) {
	const n = 100_000
	var file, used int64
	for b.Loop() {
		a, _ := filled(b, n)
		if a.Len() != n {
			b.Fatalf("Len = %d", a.Len())
		}
		if err := a.db.View(func(tx *bolt.Tx) error { used = tx.Size(); return nil }); err != nil {
			b.Fatal(err)
		}
		path := a.db.Path()
		if err := a.Close(); err != nil {
			b.Fatal(err)
		}
		fi, err := os.Stat(path)
		if err != nil {
			b.Fatal(err)
		}
		file = fi.Size()
	}
	b.ReportMetric(float64(file), "bytes-file")
	b.ReportMetric(float64(used), "bytes-used")
	b.ReportMetric(float64(used)/n, "bytes-used/set")
}
