package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/idcni/idcni/policy/simulate"
)

// manifestExts are the file names a directory walk picks up.
var manifestExts = map[string]bool{".yaml": true, ".yml": true, ".json": true}

// loadManifests reads, for policyctl simulate, every path: a file, a
// directory (recursively, *.yaml, *.yml and *.json, in lexical order) or "-"
// for standard input. Objects of other kinds are skipped with a warning
// written to warn; an object that names the same kind, namespace and name
// as an earlier one replaces it, with a warning, as applying both in order
// would.
func loadManifests(paths []string, stdin io.Reader, warn io.Writer) (*simulate.Inputs, error) {
	l := &manifestLoader{warn: warn, in: &simulate.Inputs{}, seen: map[string]string{}}
	if len(paths) == 0 {
		return nil, fmt.Errorf("no manifests given: pass -f FILE_OR_DIR (or - for standard input)")
	}
	for _, p := range paths {
		if p == "-" {
			data, err := io.ReadAll(stdin)
			if err != nil {
				return nil, fmt.Errorf("read standard input: %w", err)
			}
			if err := l.file("<stdin>", data); err != nil {
				return nil, err
			}
			continue
		}
		st, err := os.Stat(p)
		if err != nil {
			return nil, fmt.Errorf("read manifests: %w", err)
		}
		if !st.IsDir() {
			data, err := os.ReadFile(p)
			if err != nil {
				return nil, fmt.Errorf("read manifests: %w", err)
			}
			if err := l.file(p, data); err != nil {
				return nil, err
			}
			continue
		}
		found := 0
		err = filepath.WalkDir(p, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				return fmt.Errorf("read manifests: %w", err)
			}
			if d.IsDir() || !manifestExts[strings.ToLower(filepath.Ext(path))] {
				return nil
			}
			found++
			data, err := os.ReadFile(path)
			if err != nil {
				return fmt.Errorf("read manifests: %w", err)
			}
			return l.file(path, data)
		})
		if err != nil {
			return nil, err
		}
		if found == 0 {
			fmt.Fprintf(warn, "warning: directory %s holds no *.yaml, *.yml or *.json files\n", p)
		}
	}
	return l.in, nil
}

// manifestLoader files the objects of the manifests it reads.
type manifestLoader struct {
	warn io.Writer
	in   *simulate.Inputs
	seen map[string]string // "Kind ns/name" -> where it was read
}

// docSeparator is a YAML document start line ("---", maybe followed by a
// comment or directive text).
var docSeparator = regexp.MustCompile(`(?m)^---(?:[ \t].*)?$`)

func (l *manifestLoader) file(name string, data []byte) error {
	trimmed := bytes.TrimSpace(data)
	var docs [][]byte
	if len(trimmed) > 0 && (trimmed[0] == '{' || trimmed[0] == '[') {
		// A JSON file is one document; splitting it on "---" lines could
		// cut a string in two.
		docs = [][]byte{data}
	} else {
		for _, d := range docSeparator.Split(string(data), -1) {
			docs = append(docs, []byte(d))
		}
	}
	for i, doc := range docs {
		where := name
		if len(docs) > 1 {
			where = fmt.Sprintf("%s (document %d)", name, i+1)
		}
		js, err := yaml.YAMLToJSON(doc)
		if err != nil {
			return fmt.Errorf("%s: not YAML or JSON: %w", where, err)
		}
		t := bytes.TrimSpace(js)
		if len(t) == 0 || string(t) == "null" {
			continue // an empty document, or only comments
		}
		if t[0] == '[' {
			// A bare array of objects: read it like a List.
			var items []json.RawMessage
			if err := json.Unmarshal(t, &items); err != nil {
				return fmt.Errorf("%s: %w", where, err)
			}
			for j, item := range items {
				if err := l.object(fmt.Sprintf("%s item %d", where, j), item, ""); err != nil {
					return err
				}
			}
			continue
		}
		if err := l.object(where, js, ""); err != nil {
			return err
		}
	}
	return nil
}

// object files one JSON object; defaultKind is the kind of a list's items
// when they do not say.
func (l *manifestLoader) object(where string, js []byte, defaultKind string) error {
	var tm metav1.TypeMeta
	if err := json.Unmarshal(js, &tm); err != nil {
		return fmt.Errorf("%s: not a Kubernetes object: %w", where, err)
	}
	kind := tm.Kind
	if kind == "" {
		kind = defaultKind
	}
	if kind == "" {
		return fmt.Errorf("%s: object has no kind", where)
	}
	if kind == "List" || strings.HasSuffix(kind, "List") {
		var list struct {
			Items []json.RawMessage `json:"items"`
		}
		if err := json.Unmarshal(js, &list); err != nil {
			return fmt.Errorf("%s: %s: %w", where, kind, err)
		}
		itemKind := strings.TrimSuffix(kind, "List")
		for i, item := range list.Items {
			if err := l.object(fmt.Sprintf("%s item %d", where, i), item, itemKind); err != nil {
				return err
			}
		}
		return nil
	}
	switch kind {
	case "Namespace":
		var ns corev1.Namespace
		if err := l.decode(where, kind, tm.APIVersion, "v1", js, &ns, false); err != nil {
			return err
		}
		if ns.Name == "" {
			return fmt.Errorf("%s: Namespace without metadata.name", where)
		}
		if l.replace(where, "Namespace "+ns.Name) {
			for i, o := range l.in.Namespaces {
				if o.Name == ns.Name {
					l.in.Namespaces[i] = &ns
				}
			}
			return nil
		}
		l.in.Namespaces = append(l.in.Namespaces, &ns)
	case "Pod":
		var pod corev1.Pod
		if err := l.decode(where, kind, tm.APIVersion, "v1", js, &pod, false); err != nil {
			return err
		}
		if pod.Name == "" {
			return fmt.Errorf("%s: Pod without metadata.name", where)
		}
		if pod.Namespace == "" {
			pod.Namespace = metav1.NamespaceDefault
		}
		if l.replace(where, "Pod "+pod.Namespace+"/"+pod.Name) {
			for i, o := range l.in.Pods {
				if o.Namespace == pod.Namespace && o.Name == pod.Name {
					l.in.Pods[i] = &pod
				}
			}
			return nil
		}
		l.in.Pods = append(l.in.Pods, &pod)
	case "NetworkPolicy":
		var np networkingv1.NetworkPolicy
		// Strict: a misspelt field (say "podSelecter") would otherwise
		// vanish and leave a selector that selects every pod.
		if err := l.decode(where, kind, tm.APIVersion, "networking.k8s.io/v1", js, &np, true); err != nil {
			return err
		}
		if np.Name == "" {
			return fmt.Errorf("%s: NetworkPolicy without metadata.name", where)
		}
		if np.Namespace == "" {
			np.Namespace = metav1.NamespaceDefault
		}
		if l.replace(where, "NetworkPolicy "+np.Namespace+"/"+np.Name) {
			for i, o := range l.in.Policies {
				if o.Namespace == np.Namespace && o.Name == np.Name {
					l.in.Policies[i] = &np
				}
			}
			return nil
		}
		l.in.Policies = append(l.in.Policies, &np)
	default:
		var om struct {
			Metadata metav1.ObjectMeta `json:"metadata"`
		}
		_ = json.Unmarshal(js, &om) // only for the warning's text
		hint := ""
		switch kind {
		case "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob":
			hint = " (workloads are not expanded: give the Pods, e.g. kubectl get pods -o yaml)"
		}
		fmt.Fprintf(l.warn, "warning: %s: ignoring %s %q%s\n", where, kind, om.Metadata.Name, hint)
	}
	return nil
}

// decode unmarshals js into obj after checking the apiVersion.
func (l *manifestLoader) decode(where, kind, got, want string, js []byte, obj any, strict bool) error {
	if got != "" && got != want {
		return fmt.Errorf("%s: %s has apiVersion %q; simulate reads %s", where, kind, got, want)
	}
	var err error
	if strict {
		err = yaml.UnmarshalStrict(js, obj)
	} else {
		err = json.Unmarshal(js, obj)
	}
	if err != nil {
		return fmt.Errorf("%s: %s: %w", where, kind, err)
	}
	return nil
}

// replace records an object and reports whether it repeats an earlier one.
func (l *manifestLoader) replace(where, id string) bool {
	if prev, ok := l.seen[id]; ok {
		fmt.Fprintf(l.warn, "warning: %s: %s already read from %s; the later one wins\n", where, id, prev)
		l.seen[id] = where
		return true
	}
	l.seen[id] = where
	return false
}
