package kernel

import (
	"errors"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	for _, c := range []struct {
		in   string
		want Version
	}{
		{"6.18.44-fc-v1272", Version{6, 18, 44}},
		{"5.10.0-21-amd64", Version{5, 10, 0}},
		{"4.18.0-477.10.1.el8_8.x86_64", Version{4, 18, 0}},
		{"5.15.0-1034-azure", Version{5, 15, 0}},
		{"6.8.0-rc3", Version{6, 8, 0}},
		{"6.1", Version{6, 1, 0}},
		{"5.11.0+", Version{5, 11, 0}},
		{"6.6.30-talos", Version{6, 6, 30}},
		{"5.4.0-1.2.3", Version{5, 4, 0}},
	} {
		got, err := Parse(c.in)
		if err != nil || got != c.want {
			t.Errorf("Parse(%q) = %v, %v; want %v", c.in, got, err, c.want)
		}
	}
	for _, bad := range []string{"", "linux", "6", "6-generic", ".6.1", "99999999999999999999.1"} {
		if v, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) = %v, want an error", bad, v)
		}
	}
}

func TestCheckRelease(t *testing.T) {
	for _, ok := range []string{"5.11.0", "5.11.0-1-generic", "5.12.3", "6.0.0", "6.18.44-fc-v1272", "10.0"} {
		if err := CheckRelease(ok); err != nil {
			t.Errorf("CheckRelease(%q) = %v, want nil", ok, err)
		}
	}
	for _, old := range []string{"5.10.209-1-lts", "5.4.0-150-generic", "4.18.0-477.el8.x86_64", "3.10.0-1160.el7.x86_64"} {
		err := CheckRelease(old)
		if !errors.Is(err, ErrTooOld) {
			t.Errorf("CheckRelease(%q) = %v, want ErrTooOld", old, err)
			continue
		}
		// The message names the minimum and the running release as uname
		// spells it, so an operator can match it to their node.
		if msg := err.Error(); !strings.Contains(msg, "Linux >= 5.11") || !strings.Contains(msg, "this node runs "+old) {
			t.Errorf("CheckRelease(%q) message %q", old, msg)
		}
	}
	if err := CheckRelease("banana"); err == nil || errors.Is(err, ErrTooOld) || !strings.Contains(err.Error(), "5.11") {
		t.Errorf("CheckRelease(banana) = %v, want a parse error naming the minimum", err)
	}
}

func TestReleaseEnv(t *testing.T) {
	t.Setenv(ReleaseEnv, "5.4.0-test")
	if err := Check(); !errors.Is(err, ErrTooOld) || !strings.Contains(err.Error(), "5.4.0-test") {
		t.Errorf("Check with %s=5.4.0-test: %v", ReleaseEnv, err)
	}
	t.Setenv(ReleaseEnv, "")
	// The machine running the tests runs the datapath tests too, so it
	// must pass.
	if err := Check(); err != nil {
		t.Errorf("Check on this machine: %v", err)
	}
}
