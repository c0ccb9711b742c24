// Package agent is idcni's node agent: it watches Pods, Namespaces,
// NetworkPolicies, Nodes, Services and EndpointSlices through shared
// informers, turns pods into identities, policies into rules and Services
// into frontends with backends, and keeps the datapath's maps equal to
// that desired state. The plugin registers local endpoints with it over a
// unix socket, and the tools send manual overrides the same way.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	netlisters "k8s.io/client-go/listers/networking/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/manual"
	"github.com/idcni/idcni/policy"
	"github.com/idcni/idcni/policy/netpol"
	"github.com/idcni/idcni/store"
)

// Config is what the agent needs to run; cmd/idcni-agent fills it from
// flags.
type Config struct {
	NodeName    string
	BPFRoot     string
	StatePath   string
	Socket      string
	MetricsAddr string // "" disables the metrics and health listener
	// CNIConfDir receives the plugin's conflist once the agent is ready,
	// so the node reports NotReady until pods can be enforced.
	CNIConfDir  string
	CNIConfName string
	// CNIConf is the conflist to write; WriteCNIConf fills agentSocket.
	CNIConf       []byte
	IdentityGrace time.Duration
	ChurnLabels   []string
	Resync        time.Duration
	// AuditInterval is how often the maps are compared with what the
	// agent wrote (drift is repaired and counted); 0 disables.
	AuditInterval time.Duration
	// PolicyEntries and IPCacheEntries size the policy map and the
	// ipcache; 0 keeps the datapath's defaults. Maps pinned with other
	// sizes are refused, never resized.
	PolicyEntries  uint32
	IPCacheEntries uint32
	// PodCIDRs, when set, are this node's pod ranges instead of its
	// Node's spec.podCIDRs (--pod-cidr): at most one per family.
	PodCIDRs []netip.Prefix
	// NodeRoutes programs a route to every other node's pod CIDRs
	// (routes.go).
	NodeRoutes bool
	// AnnouncePods announces a new local pod's addresses to the other
	// nodes as soon as its plugin registers it, in a ConfigMap of
	// AnnounceNamespace, the agents' own (announce.go).
	AnnouncePods      bool
	AnnounceNamespace string
	// Masquerade gives pod traffic leaving the cluster (to anything not a
	// pod CIDR or a node address of any Node, nor in NoMasqueradeCIDRs)
	// the node's address, in the agent's nftables table (nftables.go);
	// off for clusters whose network routes pod CIDRs.
	Masquerade bool
	// NoMasqueradeCIDRs are destinations outside the cluster that see
	// pods' own addresses (a peered network that routes pod CIDRs).
	NoMasqueradeCIDRs []netip.Prefix
	// RoutingMode is how those routes go (tunnel.go): auto (direct to
	// nodes on a connected subnet, VXLAN to the others; "" means auto),
	// direct, or vxlan (every other node through the tunnel).
	RoutingMode RoutingMode
	// TunnelPort is the VXLAN tunnel's UDP port, the same on every node;
	// the agent's nftables table drops what arrives on it from any
	// address that is not a Node's. 0 means no tunnel port: no filter,
	// for direct routing only (the flags refuse it otherwise; a tunnel
	// asked for anyway uses DefaultTunnelPort).
	TunnelPort uint16
	// FastPath lets traffic between this node's pods and other nodes'
	// skip the node's forwarding and netfilter (fastpath.go), on the
	// routes NodeRoutes makes; off, the datapath's fast path is emptied
	// and from_net detached.
	FastPath bool
	Logger   *slog.Logger
}

// Agent is one node's agent.
type Agent struct {
	cfg    Config
	log    *slog.Logger
	client kubernetes.Interface

	factory   informers.SharedInformerFactory
	pods      corelisters.PodLister
	nss       corelisters.NamespaceLister
	policies  netlisters.NetworkPolicyLister
	nodes     corelisters.NodeLister
	synced    []cache.InformerSynced
	queue     workqueue.TypedRateLimitingInterface[key]
	recorder  record.EventRecorder
	broadcast record.EventBroadcaster

	db       *store.DB
	dp       *bpf.Datapath
	maps     datapathMaps // dp, or a fake in unit tests
	alloc    *identity.Allocator
	compiler *netpol.Compiler
	metrics  *metrics
	events   *eventHub

	// Handed from the local API to the writer loop.
	pending       pendingEndpoints
	pendingManual pendingManual
	waiting       waiters
	// manualView is the manual state for the API's lists.
	manualView atomic.Pointer[manual.State]

	// Owned by the writer loop (processNext) once Run started.
	st        *nodeState
	svc       *serviceSync // nil only for maps without a service half (never the datapath)
	endpoints *endpointRegistry
	// links is the host's links, against which the registry is checked
	// (endpointaudit.go); nil skips the checks.
	links       hostLinks
	manual      manual.State
	manualRules map[identity.ID][]policy.Rule
	manualDirty bool         // manual changed since the last save
	manualSaved manual.State // as in the state file
	refused     refusedPolicies
	accepted    map[string]*networkingv1.NetworkPolicy // the version of each policy in force
	held        []chan error                           // callers answered by the next flush
	// dirtySince is when the first change not yet in the maps arrived.
	dirtySince time.Time

	// routes programs the routes to other nodes' pod CIDRs; nil when
	// Config.NodeRoutes is off. Owned by the writer loop.
	routes *nodeRouter
	// fast keeps the fast path to other nodes' pods equal to the routes
	// in place; nil in unit tests. Owned by the writer loop.
	fast *fastPath
	// announcer announces new local pods' addresses; nil when
	// Config.AnnouncePods is off. announcements is the other nodes'
	// announcements, which the writer loop indexes by ConfigMap and by
	// pod (announce.go).
	announcer     *announcer
	announcements corelisters.ConfigMapLister
	announcedBy   map[string]map[string]announced
	announcedPod  map[string]announced
	annFactory    informers.SharedInformerFactory
	// nft keeps the agent's nftables table (masquerade, tunnel filter);
	// nil when neither is on, and then removeNFT has the start remove
	// the table an earlier run left (never in unit tests, which run in
	// the host's netns). Owned by the writer loop.
	nft       *nftTable
	removeNFT bool
	// The CNI config, owned by the writer loop: started once the first
	// write of the maps is done (the config may go out from then on),
	// confCIDRs what the config written holds, noPodCIDR while the
	// missing pod CIDR has been reported.
	started     bool
	confWritten bool
	confCIDRs   []netip.Prefix
	confMTU     int
	noPodCIDR   bool
	noUplink    bool // logged that the uplink is unknown

	ready     chan struct{}
	readyOnce sync.Once
}

// New opens the state file and the datapath (loading or upgrading it) and
// prepares the informers. Nothing runs until Run.
func New(cfg Config, client kubernetes.Interface) (*Agent, error) {
	a, err := newAgent(cfg, client, func() (*bpf.Datapath, datapathMaps, error) {
		// Replace: an agent start is how a node upgrades its programs
		// and migrates pins of another layout; the attachments move to
		// the new programs atomically.
		dp, err := bpf.Load(bpf.Options{Root: cfg.BPFRoot, Replace: true, PolicyEntries: cfg.PolicyEntries, IPCacheEntries: cfg.IPCacheEntries, Logger: cfg.Logger})
		return dp, dp, err
	})
	if err != nil {
		return nil, err
	}
	a.links = netlinkLinks{}
	if cfg.NodeRoutes {
		a.routes = newNodeRouter(netlinkRoutes{}, a.log, a.metrics, cfg.RoutingMode, cfg.TunnelPort)
	}
	// Made when off too: it undoes what an earlier run with it on left.
	a.fast = newFastPath(a.dp, a.links, a.log, cfg.FastPath && cfg.NodeRoutes)
	if a.routes != nil {
		a.routes.releasing = a.fast.sync
	}
	if cfg.Masquerade || cfg.TunnelPort != 0 {
		a.nft = newNFTable()
		a.metrics.registerNFT(a.nft)
	} else {
		a.removeNFT = true
	}
	return a, nil
}

// newAgent is New with the datapath's maps from load: unit tests pass
// fake maps and no datapath.
func newAgent(cfg Config, client kubernetes.Interface, load func() (*bpf.Datapath, datapathMaps, error)) (*Agent, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.NodeName == "" {
		return nil, errors.New("node name is empty: set --node-name or NODE_NAME (the DaemonSet passes spec.nodeName)")
	}
	a := &Agent{cfg: cfg, log: cfg.Logger, client: client, ready: make(chan struct{})}
	var err error
	a.db, err = store.Open(cfg.StatePath, 10*time.Second)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*Agent, error) { a.Close(); return nil, err }
	a.alloc, err = identity.NewAllocator(a.db, identity.Config{Grace: cfg.IdentityGrace})
	if err != nil {
		return fail(fmt.Errorf("open identity allocator: %w", err))
	}
	a.manual, err = manual.Load(a.db)
	if err != nil {
		return fail(fmt.Errorf("open manual state: %w", err))
	}
	a.manualSaved = a.manual
	a.manualView.Store(&a.manual)
	a.endpoints, err = openEndpointRegistry(a.db)
	if err != nil {
		return fail(err)
	}
	a.dp, a.maps, err = load()
	if err != nil {
		return fail(fmt.Errorf("load datapath: %w", err))
	}
	a.st = newNodeState()
	a.accepted = map[string]*networkingv1.NetworkPolicy{}
	opts := identity.Options{ChurnLabels: cfg.ChurnLabels}
	a.compiler = netpol.NewCompiler(&netpol.PodIdentities{Alloc: a.alloc, Opts: opts})
	a.metrics = newMetrics(a)
	a.events = newEventHub(a)
	if cfg.AnnouncePods && cfg.AnnounceNamespace != "" {
		a.announcer = newAnnouncer(a)
	}

	a.factory = informers.NewSharedInformerFactory(client, cfg.Resync)
	podInf := a.factory.Core().V1().Pods()
	nsInf := a.factory.Core().V1().Namespaces()
	npInf := a.factory.Networking().V1().NetworkPolicies()
	nodeInf := a.factory.Core().V1().Nodes()
	a.pods, a.nss, a.policies, a.nodes = podInf.Lister(), nsInf.Lister(), npInf.Lister(), nodeInf.Lister()
	a.queue = workqueue.NewTypedRateLimitingQueueWithConfig(workqueue.DefaultTypedControllerRateLimiter[key](),
		workqueue.TypedRateLimitingQueueConfig[key]{Name: "idcni-agent"})
	for kind, inf := range map[kind]cache.SharedIndexInformer{
		kindPod: podInf.Informer(), kindNamespace: nsInf.Informer(), kindPolicy: npInf.Informer(), kindNode: nodeInf.Informer(),
	} {
		if err := inf.SetTransform(trim); err != nil {
			return fail(fmt.Errorf("watch %s: %w", kind, err))
		}
		if _, err := inf.AddEventHandler(a.handler(kind)); err != nil {
			return fail(fmt.Errorf("watch %s: %w", kind, err))
		}
		a.synced = append(a.synced, inf.HasSynced)
	}
	// The datapath's service map, or the fake's in unit tests.
	svcMaps, _ := a.maps.(serviceMaps)
	if a.dp != nil {
		svcMaps = datapathServices{a.dp}
	}
	if err := a.watchServices(svcMaps); err != nil {
		return fail(err)
	}
	a.announcedBy, a.announcedPod = map[string]map[string]announced{}, map[string]announced{}
	if cfg.AnnounceNamespace != "" {
		// The other nodes' announcements: a factory of its own, for the
		// agents' namespace and the announcements' label only.
		a.annFactory = informers.NewSharedInformerFactoryWithOptions(client, cfg.Resync,
			informers.WithNamespace(cfg.AnnounceNamespace),
			informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = announceLabel + "=" + announceValue }))
		cmInf := a.annFactory.Core().V1().ConfigMaps()
		a.announcements = cmInf.Lister()
		if _, err := cmInf.Informer().AddEventHandler(a.handler(kindAnnounce)); err != nil {
			return fail(fmt.Errorf("watch announcements: %w", err))
		}
		a.synced = append(a.synced, cmInf.Informer().HasSynced)
	}
	a.broadcast = record.NewBroadcaster()
	a.recorder = a.broadcast.NewRecorder(eventScheme(), corev1.EventSource{Component: "idcni-agent", Host: cfg.NodeName})
	return a, nil
}

// Close releases the datapath, the state file and the informers' queue.
// Pins, attachments and maps stay: enforcement goes on without the agent.
func (a *Agent) Close() {
	if a.queue != nil {
		a.queue.ShutDown()
	}
	if a.broadcast != nil {
		a.broadcast.Shutdown()
	}
	if a.dp != nil {
		a.dp.Close()
	}
	if a.alloc != nil {
		a.alloc.Close()
	}
	if a.db != nil {
		a.db.Close()
	}
}

// Ready is closed once the caches are synced and the maps hold the
// cluster's state.
func (a *Agent) Ready() <-chan struct{} { return a.ready }

// Run serves until ctx ends: informers, the reconcile worker, the local API,
// metrics and events.
func (a *Agent) Run(ctx context.Context) error {
	a.broadcast.StartRecordingToSink(&eventSink{a.client})
	srv, err := a.serveAPI(ctx)
	if err != nil {
		return err
	}
	defer srv.Close()
	if a.cfg.MetricsAddr != "" {
		ms, err := a.serveMetrics()
		if err != nil {
			return err
		}
		defer ms.Close()
	}
	go a.events.run(ctx)
	if a.announcer != nil {
		go a.announcer.run(ctx)
	}

	a.factory.Start(ctx.Done())
	defer a.factory.Shutdown()
	if a.annFactory != nil {
		a.annFactory.Start(ctx.Done())
		defer a.annFactory.Shutdown()
	}
	start := time.Now()
	a.log.Info("waiting for informer caches")
	if !cache.WaitForCacheSync(ctx.Done(), a.synced...) {
		return fmt.Errorf("informer caches did not sync: %w", ctx.Err())
	}
	a.metrics.synced.Set(1)
	a.log.Info("informer caches synced", "after", time.Since(start).Round(time.Millisecond))

	// Start from the cluster's truth: everything in the caches goes into
	// the compiler, then one write makes the maps equal to it, removing
	// whatever stale state the last run left. A policy that does not fit
	// is refused alone, and rules that do not fit wait for room (not an
	// error); a map the kernel will not write is, and the agent does not
	// become ready on maps it could not write.
	if err := a.resync(); err != nil {
		return fmt.Errorf("first reconcile: %w", err)
	}
	a.dirtySince = time.Now()
	if err := a.flush(); err != nil {
		return fmt.Errorf("first write of the maps: %w", err)
	}
	// Every known pod on the programs, before the node takes new ones:
	// a pod left without them (pins removed while the agent was away)
	// would otherwise run unpoliced until the first periodic audit.
	a.auditAttachments()
	// Ready once the CNI config is out, which needs this node's pod
	// CIDRs: without them the writer loop writes it when they come.
	a.started = true
	if err := a.updateCNIConf(); err != nil {
		return err
	}
	if !a.confWritten {
		a.removeStaleCNIConf()
	}

	go a.alloc.RunGC(ctx, time.Minute, func(freed []identity.ID, err error) {
		if err != nil {
			a.log.Error("identity garbage collection", "err", err)
		} else if len(freed) > 0 {
			a.log.Info("released unused identities", "count", len(freed))
		}
	})
	if a.cfg.AuditInterval > 0 {
		go wait.UntilWithContext(ctx, func(context.Context) { a.queue.Add(key{kind: kindAudit}) }, a.cfg.AuditInterval)
	}
	go func() { <-ctx.Done(); a.queue.ShutDown() }()
	for a.processNext() {
	}
	return nil
}

// podUser is the allocator user of a pod, the one netpol.PodIdentities
// acquires its identity for.
func podUser(ns, name string) string { return netpol.PodUser(ns, name) }

// podAddrs returns a pod's addresses as the API server reports them.
func podAddrs(pod *corev1.Pod) []netip.Addr {
	var out []netip.Addr
	for _, ip := range pod.Status.PodIPs {
		if a, err := netip.ParseAddr(ip.IP); err == nil {
			out = append(out, a.Unmap())
		}
	}
	if len(out) == 0 && pod.Status.PodIP != "" {
		if a, err := netip.ParseAddr(pod.Status.PodIP); err == nil {
			out = append(out, a.Unmap())
		}
	}
	return out
}
