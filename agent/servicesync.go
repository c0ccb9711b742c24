package agent

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/labels"
	corelisters "k8s.io/client-go/listers/core/v1"
	discoverylisters "k8s.io/client-go/listers/discovery/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/idcni/idcni/bpf"
)

// svcValue is what the datapath holds of one frontend.
type svcValue struct {
	Backends        []svcBackend
	AffinityTimeout uint32
}

func (v svcValue) equal(o svcValue) bool {
	return v.AffinityTimeout == o.AffinityTimeout && slices.Equal(v.Backends, o.Backends)
}

// serviceMaps is the Service half of the datapath's maps, in the agent's
// own types (servicemaps.go adapts *bpf.Datapath), so the informers'
// protocol names stay the agent's keys; unit tests fake it.
type serviceMaps interface {
	// PutService replaces a frontend's backends; a full map is an error
	// wrapping bpf.ErrMapFull.
	PutService(svcFrontend, svcValue) error
	// DeleteService removes a frontend; an absent one is no error.
	DeleteService(svcFrontend) error
	Services() (map[svcFrontend]svcValue, error)
}

// retryServicesAfter is how long frontends that did not fit, or whose
// write failed, wait before the writer tries them again.
const retryServicesAfter = 5 * time.Second

// serviceSync keeps the service map equal to the cluster's Services: the
// informers hand it Service keys (an EndpointSlice's key is its
// Service's), the writer loop turns each into that Service's frontends
// (serviceEntries) and writes only the frontends a key changed. Only the
// writer loop touches its state.
type serviceSync struct {
	maps     serviceMaps
	services corelisters.ServiceLister
	slices   discoverylisters.EndpointSliceLister

	// bySvc is the frontends each Service ("ns/name") wants, owners the
	// Services claiming each frontend, sorted: two Services with one
	// ClusterIP exist only for a moment (an address freed and taken
	// again), and the first key wins on every node.
	bySvc  map[string][]svcEntry
	owners map[svcFrontend][]string
	// written is the map as this agent left it; unsure are frontends
	// whose last write failed, so the map may hold anything for them.
	written map[svcFrontend]svcValue
	unsure  map[svcFrontend]struct{}
	dirty   map[svcFrontend]struct{}
	// full are the frontends waiting for room in the service map, with
	// the Service that wants them; each was reported once when it began
	// to wait.
	full map[svcFrontend]string
}

func newServiceSync(m serviceMaps) *serviceSync {
	return &serviceSync{maps: m, bySvc: map[string][]svcEntry{}, owners: map[svcFrontend][]string{},
		written: map[svcFrontend]svcValue{}, unsure: map[svcFrontend]struct{}{}, dirty: map[svcFrontend]struct{}{},
		full: map[svcFrontend]string{}}
}

// watchServices adds the Service and EndpointSlice informers to the
// agent's factory. m is nil only for unit tests of other things, which
// then watch neither.
func (a *Agent) watchServices(m serviceMaps) error {
	if m == nil {
		return nil
	}
	s := newServiceSync(m)
	svcInf := a.factory.Core().V1().Services()
	sliceInf := a.factory.Discovery().V1().EndpointSlices()
	s.services, s.slices = svcInf.Lister(), sliceInf.Lister()
	for what, reg := range map[string]struct {
		inf cache.SharedIndexInformer
		h   cache.ResourceEventHandler
	}{
		"services":       {svcInf.Informer(), a.serviceHandler()},
		"endpointslices": {sliceInf.Informer(), a.sliceHandler()},
	} {
		if err := reg.inf.SetTransform(trim); err != nil {
			return fmt.Errorf("watch %s: %w", what, err)
		}
		if _, err := reg.inf.AddEventHandler(reg.h); err != nil {
			return fmt.Errorf("watch %s: %w", what, err)
		}
		a.synced = append(a.synced, reg.inf.HasSynced)
	}
	a.svc = s
	a.metrics.registerServices()
	return nil
}

func (a *Agent) enqueueService(ns, name string) {
	a.queue.Add(key{kind: kindService, namespace: ns, name: name})
}

func (a *Agent) serviceHandler() cache.ResourceEventHandler {
	enqueue := func(obj any) {
		k, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj)
		if err != nil {
			a.log.Error("cannot key service", "err", err)
			return
		}
		ns, name, _ := cache.SplitMetaNamespaceKey(k)
		a.enqueueService(ns, name)
	}
	return cache.ResourceEventHandlerFuncs{
		AddFunc: enqueue,
		UpdateFunc: func(old, obj any) {
			o, n := old.(*corev1.Service), obj.(*corev1.Service)
			// trim kept only what serviceEntries reads.
			if o.ResourceVersion != n.ResourceVersion && !equality.Semantic.DeepEqual(o.Spec, n.Spec) {
				enqueue(obj)
			}
		},
		DeleteFunc: enqueue,
	}
}

// sliceHandler enqueues the Service an EndpointSlice belongs to. A slice
// without the service-name label (one a user made by hand for no
// Service) is nobody's.
func (a *Agent) sliceHandler() cache.ResourceEventHandler {
	enqueue := func(obj any) {
		if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = t.Obj
		}
		es, ok := obj.(*discoveryv1.EndpointSlice)
		if !ok {
			a.log.Error("endpointslice handler got something else", "type", fmt.Sprintf("%T", obj))
			return
		}
		if svc := es.Labels[discoveryv1.LabelServiceName]; svc != "" {
			a.enqueueService(es.Namespace, svc)
		}
	}
	return cache.ResourceEventHandlerFuncs{
		AddFunc: enqueue,
		UpdateFunc: func(old, obj any) {
			o, n := old.(*discoveryv1.EndpointSlice), obj.(*discoveryv1.EndpointSlice)
			if o.ResourceVersion == n.ResourceVersion {
				return
			}
			if o.Labels[discoveryv1.LabelServiceName] != n.Labels[discoveryv1.LabelServiceName] {
				enqueue(old) // the Service it left
				enqueue(obj)
				return
			}
			if o.AddressType != n.AddressType || !equality.Semantic.DeepEqual(o.Ports, n.Ports) ||
				!equality.Semantic.DeepEqual(o.Endpoints, n.Endpoints) {
				enqueue(obj)
			}
		},
		DeleteFunc: enqueue,
	}
}

// syncService takes one Service's current frontends into the state.
func (a *Agent) syncService(ns, name string) error {
	s := a.svc
	if s == nil {
		return nil
	}
	k := ns + "/" + name
	svc, err := s.services.Services(ns).Get(name)
	if apierrors.IsNotFound(err) {
		s.set(k, nil)
		return nil
	}
	if err != nil {
		return err
	}
	sel := labels.SelectorFromSet(labels.Set{discoveryv1.LabelServiceName: name})
	eps, err := s.slices.EndpointSlices(ns).List(sel)
	if err != nil {
		return fmt.Errorf("list endpointslices of service %s: %w", k, err)
	}
	s.set(k, serviceEntries(svc, eps, a.cfg.NodeName))
	return nil
}

// resyncServices is the start: every cached Service's frontends, and the
// map as an earlier run left it, so that the first flush removes the
// frontends of Services deleted meanwhile and rewrites the ones that
// changed.
func (a *Agent) resyncServices() error {
	s := a.svc
	if s == nil {
		return nil
	}
	svcs, err := s.services.List(labels.Everything())
	if err != nil {
		return fmt.Errorf("list services: %w", err)
	}
	for _, svc := range svcs {
		if err := a.syncService(svc.Namespace, svc.Name); err != nil {
			return err
		}
	}
	have, err := s.maps.Services()
	if err != nil {
		return fmt.Errorf("read the service map: %w", err)
	}
	s.written = have
	for fe := range have {
		s.dirty[fe] = struct{}{}
	}
	return nil
}

// set records the frontends Service k wants now (none: it is gone) and
// marks the ones that moved.
func (s *serviceSync) set(k string, entries []svcEntry) {
	old := s.bySvc[k]
	if slices.EqualFunc(old, entries, sameEntry) {
		return
	}
	for _, e := range old {
		s.owners[e.Frontend] = slices.DeleteFunc(s.owners[e.Frontend], func(o string) bool { return o == k })
		if len(s.owners[e.Frontend]) == 0 {
			delete(s.owners, e.Frontend)
		}
		s.dirty[e.Frontend] = struct{}{}
	}
	if len(entries) == 0 {
		delete(s.bySvc, k)
	} else {
		s.bySvc[k] = entries
	}
	for _, e := range entries {
		os := s.owners[e.Frontend]
		if !slices.Contains(os, k) {
			os = append(os, k)
			slices.Sort(os)
		}
		s.owners[e.Frontend] = os
		s.dirty[e.Frontend] = struct{}{}
	}
}

func sameEntry(a, b svcEntry) bool {
	return a.Frontend == b.Frontend && a.AffinityTimeout == b.AffinityTimeout && a.Local == b.Local && slices.Equal(a.Backends, b.Backends)
}

// want is what the map must hold for fe, and the Service that wants it.
func (s *serviceSync) want(fe svcFrontend) (svcValue, string, bool) {
	os := s.owners[fe]
	if len(os) == 0 {
		return svcValue{}, "", false
	}
	for _, e := range s.bySvc[os[0]] {
		if e.Frontend == fe {
			return svcValue{Backends: e.Backends, AffinityTimeout: e.AffinityTimeout}, os[0], true
		}
	}
	return svcValue{}, "", false
}

func (s *serviceSync) isDirty() bool { return s != nil && len(s.dirty) > 0 }

// svcFlush is what one write of the service map did.
type svcFlush struct {
	put, deleted int
	// full are the frontends that began waiting for room in this
	// flush, by the Service that wants them; fullErr is the first error.
	full    map[svcFrontend]string
	fullErr error
	// refused counts the writes a full map refused, the waiting
	// frontends' retries included.
	refused int
	// failed counts writes that failed for another reason, err the first.
	failed int
	err    error
}

// flush writes the dirty frontends: deletions first, so that a Service
// replaced by another frees room before the new one needs it. A frontend
// that does not fit, or whose write fails, stays dirty and waits; the
// others are written regardless.
func (s *serviceSync) flush() svcFlush {
	var f svcFlush
	fes := slices.SortedFunc(maps.Keys(s.dirty), compareFrontend)
	for _, del := range []bool{true, false} {
		for _, fe := range fes {
			want, owner, ok := s.want(fe)
			if del != !ok {
				continue
			}
			have, had := s.written[fe]
			_, unsure := s.unsure[fe]
			var err error
			switch {
			case !ok && (had || unsure):
				if err = s.maps.DeleteService(fe); err == nil {
					f.deleted++
					delete(s.written, fe)
				}
			case ok && (!had || unsure || !have.equal(want)):
				if err = s.maps.PutService(fe, want); err == nil {
					f.put++
					s.written[fe] = want
				}
			}
			if err != nil {
				// A failed write may have left anything behind.
				s.unsure[fe] = struct{}{}
				if ok && errors.Is(err, bpf.ErrMapFull) {
					f.refused++
					if _, waiting := s.full[fe]; !waiting {
						s.full[fe] = owner
						if f.full == nil {
							f.full = map[svcFrontend]string{}
						}
						f.full[fe] = owner
						f.fullErr = cmp.Or(f.fullErr, err)
					}
					continue
				}
				f.failed++
				f.err = cmp.Or(f.err, err)
				continue
			}
			delete(s.unsure, fe)
			delete(s.full, fe)
			delete(s.dirty, fe)
		}
	}
	return f
}

func compareFrontend(a, b svcFrontend) int {
	return cmp.Or(a.Addr.Compare(b.Addr), cmp.Compare(a.Port, b.Port), cmp.Compare(a.Proto, b.Proto))
}

// flushServices writes the service map and reports what did not go in:
// a log line, the metrics, a Warning Event on each Service that began to
// wait for room, and a retry. A full service map fails no other write.
func (a *Agent) flushServices() {
	s := a.svc
	if !s.isDirty() {
		return
	}
	f := s.flush()
	a.metrics.observeServices(s, f)
	for fe, owner := range f.full {
		a.log.Error("service map full: flows to this frontend are not translated until there is room; fewer Services or ports, or a larger service map",
			"service", owner, "frontend", fe.String(), "err", f.fullErr)
		ns, name, _ := cache.SplitMetaNamespaceKey(owner)
		if svc, err := s.services.Services(ns).Get(name); err == nil {
			a.recorder.Eventf(svc, corev1.EventTypeWarning, "ServiceNotTranslated",
				"idcni cannot translate %s on node %s: the service map is full (%v); pods' flows to it are not translated until there is room",
				fe, a.cfg.NodeName, f.fullErr)
		}
	}
	if f.failed > 0 {
		a.log.Error("service map write failed; retrying", "frontends", f.failed, "err", f.err)
	}
	if s.isDirty() {
		a.queue.AddAfter(key{kind: kindRetry}, retryServicesAfter)
	}
}

// auditServices compares the service map with what the writer last
// wrote: a frontend that differs, is missing or nobody wants is taken as
// it is and marked dirty, so the next flush writes what it must hold.
func (a *Agent) auditServices() error {
	s := a.svc
	if s == nil {
		return nil
	}
	have, err := s.maps.Services()
	if err != nil {
		return fmt.Errorf("read the service map: %w", err)
	}
	drift := 0
	for fe, v := range have {
		if w, ok := s.written[fe]; !ok || !w.equal(v) {
			s.written[fe] = v
			s.dirty[fe] = struct{}{}
			drift++
		}
	}
	for fe := range s.written {
		if _, ok := have[fe]; !ok {
			delete(s.written, fe)
			s.dirty[fe] = struct{}{}
			drift++
		}
	}
	if drift > 0 {
		a.metrics.auditDrift.WithLabelValues("services").Add(float64(drift))
		a.log.Warn("service map drifted from what the agent wrote; repairing", "frontends", drift)
	}
	return nil
}

func (fe svcFrontend) String() string {
	return netip.AddrPortFrom(fe.Addr, fe.Port).String() + "/" + string(fe.Proto)
}
