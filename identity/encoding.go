package identity

import (
	"fmt"
	"strings"
)

// The canonical encoding is "k1=v1,k2=v2" with keys sorted. Kubernetes label
// syntax forbids '=' and ',' in keys and values, but namespace labels and
// manual sets come from elsewhere, and an encoding that two different sets can
// share would hand one set another's identity. So '\', '=' and ',' are
// escaped with '\', which makes the encoding injective, and ParseLabelSet
// accepts only what encode produces, which makes it a bijection: a stored
// string either decodes to exactly the set that wrote it or is refused.

const (
	sepLabel = ','
	sepValue = '='
	escape   = '\\'
)

func needsEscape(c byte) bool { return c == sepLabel || c == sepValue || c == escape }

func appendEscaped(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if needsEscape(s[i]) {
			b = append(b, escape)
		}
		b = append(b, s[i])
	}
	return b
}

// encode expects labels sorted by key with unique keys.
func encode(labels []Label) string {
	n := 0
	for _, l := range labels {
		n += len(l.Key) + len(l.Value) + 2
	}
	b := make([]byte, 0, n)
	for i, l := range labels {
		if i > 0 {
			b = append(b, sepLabel)
		}
		b = appendEscaped(b, l.Key)
		b = append(b, sepValue)
		b = appendEscaped(b, l.Value)
	}
	return string(b)
}

// ParseLabelSet decodes the canonical encoding that LabelSet.String returns.
// Anything else, including unsorted or duplicate keys and needless escapes, is
// an error, so that a set has one spelling only.
func ParseLabelSet(s string) (LabelSet, error) {
	if s == "" {
		return LabelSet{}, nil
	}
	var (
		labels []Label
		cur    strings.Builder
		key    string
		inVal  bool // past this label's '='
	)
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == escape:
			i++
			if i == len(s) || !needsEscape(s[i]) {
				return LabelSet{}, fmt.Errorf("label set %q: bad escape at byte %d", s, i-1)
			}
			cur.WriteByte(s[i])
		case c == sepValue && !inVal:
			key, inVal = cur.String(), true
			cur.Reset()
		case c == sepValue:
			return LabelSet{}, fmt.Errorf("label set %q: unescaped '=' in a value at byte %d", s, i)
		case c == sepLabel:
			if !inVal {
				return LabelSet{}, fmt.Errorf("label set %q: label without '=' before byte %d", s, i)
			}
			labels = append(labels, Label{key, cur.String()})
			cur.Reset()
			inVal = false
		default:
			cur.WriteByte(c)
		}
	}
	if !inVal {
		return LabelSet{}, fmt.Errorf("label set %q: last label has no '='", s)
	}
	labels = append(labels, Label{key, cur.String()})
	for i := 1; i < len(labels); i++ {
		if labels[i-1].Key >= labels[i].Key {
			return LabelSet{}, fmt.Errorf("label set %q: keys not in canonical order or repeated (%q, %q)", s, labels[i-1].Key, labels[i].Key)
		}
	}
	return LabelSet{s: s, labels: labels}, nil
}
