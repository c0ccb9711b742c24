package main

import (
	"reflect"
	"testing"

	"github.com/idcni/idcni/identity"
)

func TestShortLabels(t *testing.T) {
	pod, err := identity.FromPod(map[string]string{"app": "web", "tier": "front"}, "shop",
		map[string]string{"kubernetes.io/metadata.name": "shop", "team": "a"}, identity.Options{})
	if err != nil {
		t.Fatal(err)
	}
	bare, err := identity.FromPod(nil, "shop", nil, identity.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name   string
		labels map[string]string
		want   string
	}{
		{"pod", labelMap(pod), "ns=shop,app=web,tier=front"},
		{"pod without labels", labelMap(bare), "ns=shop"},
		{"not a pod's", map[string]string{"b": "2", "a": "1"}, "a=1,b=2"},
		{"empty", map[string]string{}, ""},
	} {
		if got := shortLabels(c.labels); got != c.want {
			t.Errorf("%s: shortLabels(%v) = %q, want %q", c.name, c.labels, got, c.want)
		}
	}
}

func labelMap(s identity.LabelSet) map[string]string {
	m := map[string]string{}
	for _, l := range s.Labels() {
		m[l.Key] = l.Value
	}
	return m
}

func TestDescribeID(t *testing.T) {
	web := map[string]string{identity.NamespaceLabel: "shop", "app": "web"}
	for _, c := range []struct {
		id     identity.ID
		labels map[string]string
		cidr   string
		want   string
	}{
		{65537, web, "", "65537 (ns=shop,app=web)"},
		{16777216, nil, "10.0.0.0/8", "16777216 (cidr=10.0.0.0/8)"},
		{identity.Host, nil, "", "host"},
		{identity.World, nil, "", "world"},
		{identity.RemoteNode, nil, "", "remote-node"},
		{identity.Unresolved, nil, "", "unresolved"},
		{1001, nil, "", "1001"},
		// Unknown here (freed, or no state file to read): the number alone.
		{65538, nil, "", "65538"},
	} {
		if got := describeID(c.id, c.labels, c.cidr); got != c.want {
			t.Errorf("describeID(%d, %v, %q) = %q, want %q", c.id, c.labels, c.cidr, got, c.want)
		}
	}
	if got, want := fullLabels(web), []string{"app=web", "io.kubernetes.pod.namespace=shop"}; !reflect.DeepEqual(got, want) {
		t.Errorf("fullLabels = %q, want %q", got, want)
	}
}
