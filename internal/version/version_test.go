package version

import (
	"strconv"
	"strings"
	"testing"

	"github.com/idcni/idcni/bpf"
)

func TestStringNamesBuildAndLayout(t *testing.T) {
	got := String("idcni")
	want := "idcni dev (pin layout " + strconv.Itoa(bpf.LayoutVersion) + ")"
	if got != want {
		t.Fatalf("String = %q, want %q", got, want)
	}
	if !strings.Contains(got, Build) {
		t.Fatalf("String = %q lacks the build %q", got, Build)
	}
}
