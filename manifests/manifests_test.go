package manifests_test

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes/scheme"
	sigsyaml "sigs.k8s.io/yaml"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/policy/simulate"
	"github.com/idcni/idcni/store"
)

// The images the manifests run; e2e/image builds them under these names.
const (
	agentImage = "idcni/agent:dev"
	testImage  = "idcni/test:dev"
)

// decode reads every object of a multi-document YAML file strictly: a
// misspelt field fails here instead of vanishing at kubectl apply.
func decode(t *testing.T, path string) []runtime.Object {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	codecs := serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict)
	rd := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var out []runtime.Object
	for {
		doc, err := rd.Read()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		js, err := sigsyaml.YAMLToJSON(doc)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		if s := strings.TrimSpace(string(js)); s == "null" || s == "" {
			continue // comments only
		}
		obj, _, err := codecs.UniversalDeserializer().Decode(js, nil, nil)
		if err != nil {
			t.Fatalf("%s: %v\n%s", path, err, doc)
		}
		out = append(out, obj)
	}
}

// installed holds the objects of idcni.yaml by kind.
type installed struct {
	ns      *corev1.Namespace
	sa      *corev1.ServiceAccount
	role    *rbacv1.ClusterRole
	binding *rbacv1.ClusterRoleBinding
	// nsRole and nsBinding are the agents' rights in their own namespace.
	nsRole    *rbacv1.Role
	nsBinding *rbacv1.RoleBinding
	config    *corev1.ConfigMap
	ds        *appsv1.DaemonSet
}

func loadInstall(t *testing.T) installed {
	t.Helper()
	var in installed
	for _, obj := range decode(t, "idcni.yaml") {
		switch o := obj.(type) {
		case *corev1.Namespace:
			in.ns = o
		case *corev1.ServiceAccount:
			in.sa = o
		case *rbacv1.ClusterRole:
			in.role = o
		case *rbacv1.ClusterRoleBinding:
			in.binding = o
		case *rbacv1.Role:
			in.nsRole = o
		case *rbacv1.RoleBinding:
			in.nsBinding = o
		case *corev1.ConfigMap:
			in.config = o
		case *appsv1.DaemonSet:
			in.ds = o
		default:
			t.Errorf("idcni.yaml holds an unexpected %T", obj)
		}
	}
	if in.ns == nil || in.sa == nil || in.role == nil || in.binding == nil || in.nsRole == nil || in.nsBinding == nil || in.config == nil || in.ds == nil {
		t.Fatalf("idcni.yaml lacks an object: %+v", in)
	}
	return in
}

func container(t *testing.T, cs []corev1.Container, name string) corev1.Container {
	t.Helper()
	for _, c := range cs {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("no container %q", name)
	return corev1.Container{}
}

func TestInstallWiring(t *testing.T) {
	in := loadInstall(t)
	ns := in.ns.Name
	for what, got := range map[string]string{
		"ServiceAccount": in.sa.Namespace, "ConfigMap": in.config.Namespace, "DaemonSet": in.ds.Namespace,
	} {
		if got != ns {
			t.Errorf("%s is in namespace %q, want %q", what, got, ns)
		}
	}
	if in.binding.RoleRef.Kind != "ClusterRole" || in.binding.RoleRef.Name != in.role.Name {
		t.Errorf("binding refers to %+v, want ClusterRole %s", in.binding.RoleRef, in.role.Name)
	}
	want := []rbacv1.Subject{{Kind: "ServiceAccount", Name: in.sa.Name, Namespace: ns}}
	if !slices.Equal(in.binding.Subjects, want) {
		t.Errorf("binding subjects %+v, want %+v", in.binding.Subjects, want)
	}
	if in.nsRole.Namespace != ns || in.nsBinding.Namespace != ns || in.nsBinding.RoleRef.Kind != "Role" || in.nsBinding.RoleRef.Name != in.nsRole.Name ||
		!slices.Equal(in.nsBinding.Subjects, want) {
		t.Errorf("the namespace's Role %+v and RoleBinding %+v do not give the agent's service account its rights in %s", in.nsRole, in.nsBinding, ns)
	}
	if got := in.ds.Spec.Template.Spec.ServiceAccountName; got != in.sa.Name {
		t.Errorf("DaemonSet runs as service account %q, want %q", got, in.sa.Name)
	}
}

// TestRBAC pins the grants to what agent/ calls. Widening them is a
// decision to make here, in review, not by accident.
func TestRBAC(t *testing.T) {
	in := loadInstall(t)
	want := []rbacv1.PolicyRule{
		{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"get", "list", "watch"}},
		{APIGroups: []string{""}, Resources: []string{"namespaces", "nodes"}, Verbs: []string{"list", "watch"}},
		{APIGroups: []string{"networking.k8s.io"}, Resources: []string{"networkpolicies"}, Verbs: []string{"list", "watch"}},
		{APIGroups: []string{""}, Resources: []string{"services"}, Verbs: []string{"get", "list", "watch"}},
		{APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: []string{"get", "list", "watch"}},
		{APIGroups: []string{""}, Resources: []string{"events"}, Verbs: []string{"create", "patch"}},
	}
	if len(in.role.Rules) != len(want) {
		t.Fatalf("ClusterRole has %d rules, want %d: %+v", len(in.role.Rules), len(want), in.role.Rules)
	}
	// In the agents' namespace: the announcements of new pods
	// (agent/announce.go), never a delete.
	nsWant := []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"configmaps"}, Verbs: []string{"list", "watch", "create", "update"}}}
	if len(in.nsRole.Rules) != 1 || !slices.Equal(in.nsRole.Rules[0].Verbs, nsWant[0].Verbs) || !slices.Equal(in.nsRole.Rules[0].Resources, nsWant[0].Resources) ||
		!slices.Equal(in.nsRole.Rules[0].APIGroups, nsWant[0].APIGroups) || len(in.nsRole.Rules[0].ResourceNames) > 0 {
		t.Errorf("Role rules %+v, want %+v", in.nsRole.Rules, nsWant)
	}
	for i, r := range in.role.Rules {
		w := want[i]
		if !slices.Equal(r.APIGroups, w.APIGroups) || !slices.Equal(r.Resources, w.Resources) ||
			!slices.Equal(r.Verbs, w.Verbs) || len(r.ResourceNames) > 0 || len(r.NonResourceURLs) > 0 {
			t.Errorf("rule %d: %+v, want %+v", i, r, w)
		}
	}
}

func TestDaemonSet(t *testing.T) {
	in := loadInstall(t)
	ds := in.ds
	spec := ds.Spec.Template.Spec
	if ds.Spec.UpdateStrategy.Type != appsv1.RollingUpdateDaemonSetStrategyType {
		t.Errorf("update strategy %q, want RollingUpdate", ds.Spec.UpdateStrategy.Type)
	}
	if !spec.HostNetwork {
		t.Error("not hostNetwork: the agent is the pod network and cannot run on it")
	}
	if spec.HostPID || spec.HostIPC {
		t.Error("hostPID or hostIPC: the agent needs neither")
	}
	if spec.PriorityClassName != "system-node-critical" {
		t.Errorf("priorityClassName %q, want system-node-critical", spec.PriorityClassName)
	}
	everywhere := slices.ContainsFunc(spec.Tolerations, func(tl corev1.Toleration) bool {
		return tl.Key == "" && tl.Operator == corev1.TolerationOpExists && tl.Effect == ""
	})
	if !everywhere {
		t.Errorf("tolerations %+v do not tolerate every taint (not-ready and control-plane nodes included)", spec.Tolerations)
	}

	all := append(slices.Clone(spec.InitContainers), spec.Containers...)
	for _, c := range all {
		if c.Image != agentImage || c.ImagePullPolicy != corev1.PullIfNotPresent {
			t.Errorf("container %s: image %s (%s), want %s (IfNotPresent: it is imported, not pulled)", c.Name, c.Image, c.ImagePullPolicy, agentImage)
		}
		sc := c.SecurityContext
		if sc == nil || sc.Capabilities == nil {
			t.Errorf("container %s has no securityContext capabilities", c.Name)
			continue
		}
		if sc.Privileged != nil && *sc.Privileged {
			t.Errorf("container %s is privileged", c.Name)
		}
		if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
			t.Errorf("container %s allows privilege escalation", c.Name)
		}
		if !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
			t.Errorf("container %s drops %v, want ALL", c.Name, sc.Capabilities.Drop)
		}
		if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
			t.Errorf("container %s has a writable root filesystem", c.Name)
		}
		for _, m := range c.VolumeMounts {
			if m.MountPropagation != nil && *m.MountPropagation != corev1.MountPropagationNone {
				t.Errorf("container %s mounts %s with %s propagation: containerd refuses that on hosts whose mounts are private", c.Name, m.MountPath, *m.MountPropagation)
			}
		}
	}

	agent := container(t, spec.Containers, "agent")
	caps := agent.SecurityContext.Capabilities.Add
	if want := []corev1.Capability{"BPF", "NET_ADMIN", "PERFMON"}; !slices.Equal(caps, want) {
		t.Errorf("agent adds capabilities %v, want exactly %v", caps, want)
	}
	install := container(t, spec.InitContainers, "install-cni")
	if n := len(install.SecurityContext.Capabilities.Add); n > 0 {
		t.Errorf("install-cni adds capabilities %v; copying files needs none", install.SecurityContext.Capabilities.Add)
	}

	// SYS_ADMIN in one container only, the short-lived migrate, which
	// runs first: a migration it refuses leaves the node as it was, the
	// plugin included.
	migrate := container(t, spec.InitContainers, "migrate")
	if want := []corev1.Capability{"BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"}; !slices.Equal(migrate.SecurityContext.Capabilities.Add, want) {
		t.Errorf("migrate adds capabilities %v, want exactly %v", migrate.SecurityContext.Capabilities.Add, want)
	}
	if !slices.Equal(migrate.Command, []string{"/usr/bin/idcni-agent", "migrate"}) {
		t.Errorf("migrate runs %q, want idcni-agent migrate", migrate.Command)
	}
	if i := slices.IndexFunc(spec.InitContainers, func(c corev1.Container) bool { return c.Name == "migrate" }); i != 0 {
		t.Errorf("migrate is init container %d of %d: it must run first, before install-cni", i+1, len(spec.InitContainers))
	}
	for _, c := range all {
		if c.Name != "migrate" && slices.Contains(c.SecurityContext.Capabilities.Add, "SYS_ADMIN") {
			t.Errorf("container %s adds SYS_ADMIN; only migrate may", c.Name)
		}
	}

	// NODE_NAME from the downward API.
	var nodeName bool
	for _, e := range agent.Env {
		if e.Name == "NODE_NAME" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName" {
			nodeName = true
		}
	}
	if !nodeName {
		t.Error("agent has no NODE_NAME from spec.nodeName")
	}

	// Probes on the port the agent serves them on.
	port := flagValue(t, agent.Args, "--metrics-addr")
	if !strings.HasPrefix(port, ":") {
		t.Fatalf("--metrics-addr=%s: want :PORT, on every address, for the kubelet's probes", port)
	}
	named := map[string]int32{}
	for _, p := range agent.Ports {
		named[p.Name] = p.ContainerPort
	}
	for path, probe := range map[string]*corev1.Probe{"/readyz": agent.ReadinessProbe, "/healthz": agent.LivenessProbe} {
		if probe == nil || probe.HTTPGet == nil {
			t.Errorf("no HTTP probe for %s", path)
			continue
		}
		p := probe.HTTPGet.Port
		num := p.IntVal
		if p.StrVal != "" {
			num = named[p.StrVal]
		}
		if probe.HTTPGet.Path != path || ":"+strconv.Itoa(int(num)) != port {
			t.Errorf("probe %s:%v, want %s on %s", probe.HTTPGet.Path, p.String(), path, port)
		}
	}
	if agent.ReadinessProbe.HTTPGet.Path != "/readyz" || agent.LivenessProbe.HTTPGet.Path != "/healthz" {
		t.Error("readiness must be /readyz (maps written) and liveness /healthz (process up)")
	}
}

// flagValue returns the value of --name=value in args.
func flagValue(t *testing.T, args []string, name string) string {
	t.Helper()
	for _, a := range args {
		if v, ok := strings.CutPrefix(a, name+"="); ok {
			return v
		}
	}
	t.Fatalf("no %s=... in %v", name, args)
	return ""
}

// TestHostPaths checks that every path the agent shares with the CNI
// plugin (which runs on the host and finds it by these defaults) is mounted
// from the host at the same path, and the plugins' bin directory is where
// install-cni writes.
func TestHostPaths(t *testing.T) {
	in := loadInstall(t)
	spec := in.ds.Spec.Template.Spec
	hostPath := map[string]string{}
	for _, v := range spec.Volumes {
		if v.HostPath != nil {
			hostPath[v.Name] = v.HostPath.Path
		}
	}
	// mounted reports whether path inside container c is a host path at
	// the same place, and writable.
	mounted := func(c corev1.Container, path string) (host string, rw bool) {
		for _, m := range c.VolumeMounts {
			hp, ok := hostPath[m.Name]
			if !ok || !(path == m.MountPath || strings.HasPrefix(path, m.MountPath+"/")) {
				continue
			}
			return hp + strings.TrimPrefix(path, m.MountPath), !m.ReadOnly
		}
		return "", false
	}
	agent := container(t, spec.Containers, "agent")
	for _, p := range []string{
		bpf.DefaultRoot,
		filepath.Dir(store.DefaultPath),
		filepath.Dir(api.DefaultSocket),
		flagValue(t, agent.Args, "--cni-conf-dir"),
	} {
		host, rw := mounted(agent, p)
		if host != p || !rw {
			t.Errorf("agent: %s is host path %q (writable %v), want the host's %s, writable", p, host, rw, p)
		}
	}
	if host, rw := mounted(agent, "/var/lib/cni"); host != "/var/lib/cni" || rw {
		t.Errorf("agent: /var/lib/cni is host path %q (writable %v), want the host's, read-only", host, rw)
	}

	install := container(t, spec.InitContainers, "install-cni")
	binDir := ""
	for i, a := range install.Command {
		if a == "--bin-dir" && i+1 < len(install.Command) {
			binDir = install.Command[i+1]
		}
	}
	if host, rw := mounted(install, binDir); host != "/opt/cni/bin" || !rw {
		t.Errorf("install-cni --bin-dir %q is host path %q (writable %v), want /opt/cni/bin", binDir, host, rw)
	}
	if host, _ := mounted(agent, "/opt/cni/bin"); host != "" {
		t.Error("the agent mounts /opt/cni/bin: only install-cni writes there")
	}
}

var varRef = regexp.MustCompile(`\$\(([A-Z_]+)\)`)

// TestAgentFlags runs the real idcni-agent on the DaemonSet's command lines
// (with the ConfigMap's values) plus --help: cobra parses every flag before
// it looks at --help, so an unknown flag or a value of the wrong type
// fails here rather than in a crash-looping pod.
func TestAgentFlags(t *testing.T) {
	in := loadInstall(t)
	spec := in.ds.Spec.Template.Spec
	agent := container(t, spec.Containers, "agent")

	env := map[string]string{}
	for _, e := range agent.Env {
		switch {
		case e.ValueFrom != nil && e.ValueFrom.ConfigMapKeyRef != nil:
			ref := e.ValueFrom.ConfigMapKeyRef
			if ref.Name != in.config.Name {
				t.Errorf("env %s reads ConfigMap %q, want %q", e.Name, ref.Name, in.config.Name)
			}
			v, ok := in.config.Data[ref.Key]
			if !ok && (ref.Optional == nil || !*ref.Optional) {
				t.Errorf("env %s reads key %q, which the ConfigMap lacks", e.Name, ref.Key)
			}
			if ok {
				env[e.Name] = v
			}
		case e.ValueFrom != nil && e.ValueFrom.FieldRef != nil:
			env[e.Name] = "node-1"
		default:
			env[e.Name] = e.Value
		}
	}
	if lvl := in.config.Data["log-level"]; !slices.Contains([]string{"debug", "info", "warn", "error"}, lvl) {
		t.Errorf("ConfigMap log-level %q: the agent takes debug, info, warn or error", lvl)
	}
	var args []string
	for _, a := range agent.Args {
		args = append(args, varRef.ReplaceAllStringFunc(a, func(ref string) string {
			name := varRef.FindStringSubmatch(ref)[1]
			v, ok := env[name]
			if !ok {
				t.Errorf("argument %q refers to $(%s), which no required env var sets: the kubelet would pass it literally", a, name)
			}
			return v
		}))
	}

	bin := filepath.Join(t.TempDir(), "idcni-agent")
	build := exec.Command("go", "build", "-o", bin, "github.com/idcni/idcni/cmd/idcni-agent")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build idcni-agent: %v\n%s", err, out)
	}
	if agent.Command[0] != "/usr/bin/idcni-agent" {
		t.Errorf("agent command %v, want /usr/bin/idcni-agent (where e2e/image puts it)", agent.Command)
	}
	run := func(what string, argv []string) {
		out, err := exec.Command(bin, append(argv, "--help")...).CombinedOutput()
		if err != nil {
			t.Errorf("%s: idcni-agent %s --help: %v\n%s", what, strings.Join(argv, " "), err, out)
		}
	}
	run("agent container", args)
	install := container(t, spec.InitContainers, "install-cni")
	if install.Command[0] != "/usr/bin/idcni-agent" {
		t.Errorf("install-cni command %v, want /usr/bin/idcni-agent", install.Command)
	}
	run("install-cni init container", install.Command[1:])
}

// TestExamples checks the seed's pods and policies, and that idcni's own
// simulator, given the example objects, finds the seed's answer: frontend
// reaches backend on port 80, and nothing reaches frontend. (cmd/policyctl's
// TestSimulateManifestsFolder reads this folder as `policyctl simulate -f
// manifests/` does.)
func TestExamples(t *testing.T) {
	var pods []*corev1.Pod
	var policies []string
	var in simulate.Inputs
	sas := map[string]bool{}
	files, err := filepath.Glob(filepath.Join("examples", "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no examples: %v", err)
	}
	for _, f := range files {
		for _, obj := range decode(t, f) {
			switch o := obj.(type) {
			case *corev1.Namespace:
				in.Namespaces = append(in.Namespaces, o)
			case *corev1.Pod:
				pods = append(pods, o)
				in.Pods = append(in.Pods, o)
			case *corev1.ServiceAccount:
				sas[o.Namespace+"/"+o.Name] = true
			case *networkingv1.NetworkPolicy:
				policies = append(policies, o.Name)
				in.Policies = append(in.Policies, o)
			}
		}
	}
	labels := map[string]string{}
	for _, p := range pods {
		labels[p.Name] = p.Labels["app"]
		c := p.Spec.Containers[0]
		if c.Image != testImage || c.ImagePullPolicy != corev1.PullNever {
			t.Errorf("pod %s: image %s (%s), want %s, Never", p.Name, c.Image, c.ImagePullPolicy, testImage)
		}
		if !sas[p.Namespace+"/"+p.Spec.ServiceAccountName] {
			t.Errorf("pod %s runs as service account %q, which the examples do not create", p.Name, p.Spec.ServiceAccountName)
		}
	}
	if labels["frontend"] != "frontend" || labels["backend"] != "backend" {
		t.Errorf("pods and their app labels: %v, want frontend and backend", labels)
	}
	slices.Sort(policies)
	if want := []string{"allow-frontend-to-backend", "default-deny-ingress"}; !slices.Equal(policies, want) {
		t.Errorf("policies %v, want %v", policies, want)
	}

	var warn bytes.Buffer
	results, err := simulate.Run(&in, simulate.Options{Ports: []int{80}}, &warn)
	if err != nil {
		t.Fatalf("simulate: %v\n%s", err, warn.String())
	}
	got := map[string]bool{}
	for _, r := range results {
		got[r.From+" -> "+r.To] = r.Allowed
	}
	want := map[string]bool{
		"idcni-demo/frontend -> idcni-demo/backend": true,
		"idcni-demo/backend -> idcni-demo/frontend": false,
	}
	for k, v := range want {
		if a, ok := got[k]; !ok || a != v {
			t.Errorf("simulate %s port 80: allowed %v (found %v), want %v", k, a, ok, v)
		}
	}
}
