package e2e

import (
	"fmt"
	"net/netip"
	"strconv"
	"sync"
	"testing"
	"time"

	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/identity"
)

// Issue 11, defect 1: every node wrote the rules of every identity of the
// cluster, though only its own endpoints are ever subjects. 270 pods with
// distinct labels in one namespace on another node, under an "allow from
// the same namespace" policy, needed 270 x 270 entries, overflowed the
// 65,536-entry policy map, every flush failed, and unrelated CNI ADDs
// failed with it.
func TestAgentRemoteIdentitiesDoNotFillThePolicyMap(t *testing.T) {
	e := newAgentEnv(t)
	e.kube.CreateNamespace(t, "big", nil)
	e.kube.CreateNamespace(t, "unrelated", nil)
	e.apply(t, &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "same-namespace", Namespace: "big"},
		Spec: networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{
			From: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{}}},
		}}},
	})
	const remote = 270
	var wg sync.WaitGroup
	work := make(chan int)
	for range 16 {
		wg.Go(func() {
			for i := range work {
				createPodObject(t, e, "big", fmt.Sprintf("r%d", i), map[string]string{"i": strconv.Itoa(i)},
					netip.AddrFrom4([4]byte{10, 251, byte(i / 250), byte(1 + i%250)}))
			}
		})
	}
	for i := range remote {
		work <- i
	}
	close(work)
	wg.Wait()

	dp, err := bpf.Open(e.BPFRoot)
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	// The agent has taken them in when the last one resolves (on the old
	// agent it never does: every flush fails).
	last := netip.AddrFrom4([4]byte{10, 251, byte((remote - 1) / 250), byte(1 + (remote-1)%250)})
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if id, ok, _ := dp.IPCacheLookup(last); ok && id.IsLabel() {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}

	// Pods start, in the namespace and elsewhere.
	local := e.newPod(t, "big", "local", map[string]string{"app": "local"})
	other := e.newPod(t, "unrelated", "other", map[string]string{"app": "other"})
	local.serve(t, 80)
	eventually(t, "unrelated/other -> big/local:80 (not in the namespace)", false, func() bool { return other.reach(local, 80) })

	ms, err := dp.Policy()
	if err != nil {
		t.Fatal(err)
	}
	subjects := map[identity.ID]int{}
	for k := range ms.Entries {
		subjects[k.Subject]++
	}
	if len(subjects) != 1 {
		t.Fatalf("policy map holds rules of %d identities (%v), want only the local pod's in namespace big", len(subjects), subjects)
	}
	for id, n := range subjects {
		if n < remote+1 {
			t.Errorf("identity %s has %d entries, want one per peer identity (%d)", id, n, remote+1)
		}
	}
}
