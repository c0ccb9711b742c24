// Package kernel checks that the running Linux kernel can run idcni's
// datapath, so an old kernel is refused up front with a sentence naming it
// instead of a verifier dump or an EPERM from deep inside a load.
package kernel

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Minimum is the oldest kernel the datapath runs on. Each feature below is
// used by bpf/kernel/*.c or by the loader; the newest of them sets the bar:
//
//   - bpf_ktime_get_coarse_ns (conntrack deadlines): 5.11
//   - bpf_redirect_peer (direct delivery to local pods): 5.10
//   - the BPF ring buffer (verdict events): 5.8
//   - CAP_BPF and CAP_PERFMON (the DaemonSet runs with them, not as root): 5.8
var Minimum = Version{Major: 5, Minor: 11}

// Why names what Minimum is for, for error messages and --help.
const Why = "bpf_ktime_get_coarse_ns, bpf_redirect_peer, the BPF ring buffer, CAP_BPF"

// ReleaseEnv overrides the release uname reports. It exists for tests,
// which must see the refusal without an old kernel at hand; on a node it
// also lets an operator whose distribution backported the features above
// into an older-numbered kernel run idcni at their own risk.
const ReleaseEnv = "IDCNI_KERNEL_RELEASE"

// Version is a kernel version's numeric part.
type Version struct{ Major, Minor, Patch int }

func (v Version) String() string { return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Patch) }

// Less reports whether v is older than w.
func (v Version) Less(w Version) bool {
	if v.Major != w.Major {
		return v.Major < w.Major
	}
	if v.Minor != w.Minor {
		return v.Minor < w.Minor
	}
	return v.Patch < w.Patch
}

// Parse reads the version at the start of a uname release string:
// "6.18.44-fc-v1272", "5.10.0-21-amd64", "4.18.0-477.el8.x86_64",
// "6.8.0-rc3", "6.1". What follows the numbers (distribution suffixes)
// is ignored: only the numbers say which features upstream had.
func Parse(release string) (Version, error) {
	var nums [3]int
	rest := release
	n := 0
	for ; n < 3; n++ {
		end := 0
		for end < len(rest) && rest[end] >= '0' && rest[end] <= '9' {
			end++
		}
		if end == 0 {
			break
		}
		v, err := strconv.Atoi(rest[:end])
		if err != nil {
			return Version{}, fmt.Errorf("kernel release %q: %w", release, err)
		}
		nums[n] = v
		rest = rest[end:]
		if !strings.HasPrefix(rest, ".") {
			n++
			break
		}
		rest = rest[1:]
	}
	// A major without a minor is no Linux release name: refuse rather
	// than guess.
	if n < 2 {
		return Version{}, fmt.Errorf("kernel release %q does not start with MAJOR.MINOR", release)
	}
	return Version{Major: nums[0], Minor: nums[1], Patch: nums[2]}, nil
}

// Release returns the running kernel's release, or $IDCNI_KERNEL_RELEASE
// when that is set.
func Release() (string, error) {
	if r := os.Getenv(ReleaseEnv); r != "" {
		return r, nil
	}
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "", fmt.Errorf("uname: %w", err)
	}
	return unix.ByteSliceToString(u.Release[:]), nil
}

// TooOldError is the refusal of a kernel older than Minimum.
type TooOldError struct {
	Release string
	Running Version
}

func (e *TooOldError) Error() string {
	return fmt.Sprintf("idcni needs Linux >= %d.%d (%s); this node runs %s",
		Minimum.Major, Minimum.Minor, Why, e.Release)
}

// ErrTooOld matches every TooOldError with errors.Is.
var ErrTooOld = errors.New("kernel too old for idcni")

func (e *TooOldError) Is(target error) bool { return target == ErrTooOld }

// Check refuses a kernel older than Minimum. A release it cannot read is an
// error too: starting anyway would trade a clear message for an obscure one.
func Check() error {
	r, err := Release()
	if err != nil {
		return err
	}
	return CheckRelease(r)
}

// CheckRelease is Check for a given release string.
func CheckRelease(release string) error {
	v, err := Parse(release)
	if err != nil {
		return fmt.Errorf("cannot tell whether this kernel runs idcni (needs Linux >= %d.%d): %w", Minimum.Major, Minimum.Minor, err)
	}
	if v.Less(Minimum) {
		return &TooOldError{Release: release, Running: v}
	}
	return nil
}
