// Package version is what every idcni binary answers to --version: the
// build (git describe, set by the Makefile) and the pin layout it reads and
// writes (bpf.LayoutVersion), which says whether two builds can share a
// node's pins.
package version

import (
	"fmt"

	"github.com/idcni/idcni/bpf"
)

// Build is `git describe --always --dirty` of the tree the binary was built
// from, set with -ldflags "-X github.com/idcni/idcni/internal/version.Build=...";
// "dev" for a plain `go build`.
var Build = "dev"

// String is the --version line of the named binary.
func String(binary string) string {
	return fmt.Sprintf("%s %s (pin layout %d)", binary, Build, bpf.LayoutVersion)
}
