package inventory

import (
	"fmt"
	"net/netip"
	"sort"
	"strings"

	"go.yaml.in/yaml/v3"
	"k8s.io/apimachinery/pkg/util/validation"
)

// File is one parsed, validated inventory.
type File struct {
	TrustDomain string
	Namespaces  map[string]map[string]string // name → labels
	Workloads   []Workload
	Services    []Service
}

// Workload is one pod, or (Name ending in '*') every pod whose name starts
// with the prefix.
type Workload struct {
	Namespace      string
	Name           string
	UID            string
	Node           string
	ServiceAccount string
	Labels         map[string]string
	IPs            []netip.Addr
	HostNetwork    bool
	Line           int
}

// Prefix reports whether the entry matches by name prefix, and the prefix.
func (w *Workload) Prefix() (string, bool) {
	if p, ok := strings.CutSuffix(w.Name, "*"); ok {
		return p, true
	}
	return "", false
}

// Matches reports whether a pod name belongs to this entry.
func (w *Workload) Matches(name string) bool {
	if p, ok := w.Prefix(); ok {
		return strings.HasPrefix(name, p)
	}
	return w.Name == name
}

// Service is a virtual IP in front of the workloads its selector picks.
type Service struct {
	Namespace string
	Name      string
	VIPs      []netip.Addr
	Ports     []ServicePort
	Selector  map[string]string
	Line      int
}

// ServicePort maps a service port to the workloads' port.
type ServicePort struct {
	Name       string
	Port       uint16
	TargetPort uint16
}

// lineError is an error at a place in the file.
type lineError struct {
	line int
	path string
	msg  string
}

func (e *lineError) Error() string {
	if e.line > 0 {
		return fmt.Sprintf("line %d: %s: %s", e.line, e.path, e.msg)
	}
	return fmt.Sprintf("%s: %s", e.path, e.msg)
}

func errAt(n *yaml.Node, path, format string, a ...any) error {
	line := 0
	if n != nil {
		line = n.Line
	}
	return &lineError{line: line, path: path, msg: fmt.Sprintf(format, a...)}
}

// Parse reads and validates an inventory. The first problem is returned,
// naming its line and field.
func Parse(b []byte) (*File, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(b, &doc); err != nil {
		return nil, err
	}
	f := &File{Namespaces: map[string]map[string]string{}}
	if len(doc.Content) == 0 {
		return f, nil // empty file: nothing enrolled
	}
	root := doc.Content[0]
	fields, err := mapping(root, "inventory", "trustDomain", "namespaces", "workloads", "services")
	if err != nil {
		return nil, err
	}
	if n := fields["trustDomain"]; n != nil {
		if f.TrustDomain, err = str(n, "trustDomain"); err != nil {
			return nil, err
		}
		if f.TrustDomain == "" || strings.ContainsAny(f.TrustDomain, "/:@ ") {
			return nil, errAt(n, "trustDomain", "%q must be a non-empty DNS-like name", f.TrustDomain)
		}
	}
	if err := f.parseNamespaces(fields["namespaces"]); err != nil {
		return nil, err
	}
	if err := f.parseWorkloads(fields["workloads"]); err != nil {
		return nil, err
	}
	if err := f.parseServices(fields["services"]); err != nil {
		return nil, err
	}
	return f, nil
}

func (f *File) parseNamespaces(n *yaml.Node) error {
	items, err := seq(n, "namespaces")
	if err != nil {
		return err
	}
	for i, it := range items {
		path := fmt.Sprintf("namespaces[%d]", i)
		m, err := mapping(it, path, "name", "labels")
		if err != nil {
			return err
		}
		name, err := dnsLabel(m["name"], it, path+".name")
		if err != nil {
			return err
		}
		if _, dup := f.Namespaces[name]; dup {
			return errAt(m["name"], path+".name", "namespace %q listed twice", name)
		}
		labels, err := labelMap(m["labels"], path+".labels")
		if err != nil {
			return err
		}
		f.Namespaces[name] = labels
	}
	return nil
}

func (f *File) parseWorkloads(n *yaml.Node) error {
	items, err := seq(n, "workloads")
	if err != nil {
		return err
	}
	names := map[string]int{}
	ips := map[netip.Addr]string{}
	for i, it := range items {
		path := fmt.Sprintf("workloads[%d]", i)
		m, err := mapping(it, path, "namespace", "name", "uid", "node", "serviceAccount", "labels", "ips", "hostNetwork")
		if err != nil {
			return err
		}
		w := Workload{Line: it.Line, ServiceAccount: "default"}
		if w.Namespace, err = dnsLabel(m["namespace"], it, path+".namespace"); err != nil {
			return err
		}
		if _, ok := f.Namespaces[w.Namespace]; !ok {
			return errAt(m["namespace"], path+".namespace", "namespace %q is not listed under namespaces", w.Namespace)
		}
		if m["name"] == nil {
			return errAt(it, path+".name", "required")
		}
		if w.Name, err = str(m["name"], path+".name"); err != nil {
			return err
		}
		if err := checkPodName(w.Name); err != nil {
			return errAt(m["name"], path+".name", "%v", err)
		}
		key := w.Namespace + "/" + w.Name
		if prev, dup := names[key]; dup {
			return errAt(m["name"], path+".name", "%s listed twice (also at workloads[%d])", key, prev)
		}
		names[key] = i
		if n := m["uid"]; n != nil {
			if w.UID, err = str(n, path+".uid"); err != nil {
				return err
			}
		}
		if n := m["node"]; n != nil {
			if w.Node, err = str(n, path+".node"); err != nil {
				return err
			}
		}
		if n := m["serviceAccount"]; n != nil {
			if w.ServiceAccount, err = dnsLabel(n, it, path+".serviceAccount"); err != nil {
				return err
			}
		}
		if w.Labels, err = labelMap(m["labels"], path+".labels"); err != nil {
			return err
		}
		if n := m["hostNetwork"]; n != nil {
			if err := n.Decode(&w.HostNetwork); err != nil {
				return errAt(n, path+".hostNetwork", "want true or false")
			}
		}
		if w.IPs, err = addrList(m["ips"], path+".ips"); err != nil {
			return err
		}
		if _, prefix := w.Prefix(); prefix && len(w.IPs) > 0 {
			return errAt(m["ips"], path+".ips", "a name prefix (%q) matches many pods and cannot list IPs; they are learned at CNI ADD", w.Name)
		}
		for j, ip := range w.IPs {
			if other, dup := ips[ip]; dup {
				return errAt(m["ips"], fmt.Sprintf("%s.ips[%d]", path, j), "%s already belongs to %s", ip, other)
			}
			ips[ip] = key
		}
		f.Workloads = append(f.Workloads, w)
	}
	return nil
}

func (f *File) parseServices(n *yaml.Node) error {
	items, err := seq(n, "services")
	if err != nil {
		return err
	}
	vips := map[netip.AddrPort]string{}
	names := map[string]bool{}
	for i, it := range items {
		path := fmt.Sprintf("services[%d]", i)
		m, err := mapping(it, path, "namespace", "name", "vips", "ports", "selector")
		if err != nil {
			return err
		}
		s := Service{Line: it.Line}
		if s.Namespace, err = dnsLabel(m["namespace"], it, path+".namespace"); err != nil {
			return err
		}
		if _, ok := f.Namespaces[s.Namespace]; !ok {
			return errAt(m["namespace"], path+".namespace", "namespace %q is not listed under namespaces", s.Namespace)
		}
		if s.Name, err = dnsLabel(m["name"], it, path+".name"); err != nil {
			return err
		}
		key := s.Namespace + "/" + s.Name
		if names[key] {
			return errAt(m["name"], path+".name", "service %s listed twice", key)
		}
		names[key] = true
		if s.VIPs, err = addrList(m["vips"], path+".vips"); err != nil {
			return err
		}
		if len(s.VIPs) == 0 {
			return errAt(it, path+".vips", "at least one virtual IP is required")
		}
		ports, err := seq(m["ports"], path+".ports")
		if err != nil {
			return err
		}
		if len(ports) == 0 {
			return errAt(it, path+".ports", "at least one port is required")
		}
		for j, pn := range ports {
			pp := fmt.Sprintf("%s.ports[%d]", path, j)
			pm, err := mapping(pn, pp, "name", "port", "targetPort", "protocol")
			if err != nil {
				return err
			}
			var sp ServicePort
			if n := pm["name"]; n != nil {
				if sp.Name, err = str(n, pp+".name"); err != nil {
					return err
				}
			}
			if n := pm["protocol"]; n != nil {
				proto, err := str(n, pp+".protocol")
				if err != nil {
					return err
				}
				if proto != "TCP" {
					return errAt(n, pp+".protocol", "%q: only TCP is meshed", proto)
				}
			}
			if sp.Port, err = port(pm["port"], pn, pp+".port"); err != nil {
				return err
			}
			sp.TargetPort = sp.Port
			if pm["targetPort"] != nil {
				if sp.TargetPort, err = port(pm["targetPort"], pn, pp+".targetPort"); err != nil {
					return err
				}
			}
			for _, vip := range s.VIPs {
				ap := netip.AddrPortFrom(vip, sp.Port)
				if other, dup := vips[ap]; dup {
					return errAt(pm["port"], pp+".port", "%s is already service %s", ap, other)
				}
				vips[ap] = key
			}
			s.Ports = append(s.Ports, sp)
		}
		if s.Selector, err = labelMap(m["selector"], path+".selector"); err != nil {
			return err
		}
		if len(s.Selector) == 0 {
			return errAt(it, path+".selector", "a selector is required (an empty one would select every workload)")
		}
		f.Services = append(f.Services, s)
	}
	return nil
}

// mapping checks n is a mapping with only allowed keys and returns them.
func mapping(n *yaml.Node, path string, allowed ...string) (map[string]*yaml.Node, error) {
	if n == nil {
		return nil, errAt(nil, path, "missing")
	}
	if n.Kind == yaml.AliasNode {
		n = n.Alias
	}
	if n.Kind != yaml.MappingNode {
		return nil, errAt(n, path, "want a mapping (key: value), found %s", kind(n))
	}
	out := make(map[string]*yaml.Node, len(n.Content)/2)
	for i := 0; i+1 < len(n.Content); i += 2 {
		k := n.Content[i]
		if k.Kind != yaml.ScalarNode {
			return nil, errAt(k, path, "keys must be plain strings")
		}
		known := false
		for _, a := range allowed {
			if a == k.Value {
				known = true
				break
			}
		}
		if !known {
			return nil, errAt(k, path+"."+k.Value, "unknown field (known: %s)", strings.Join(allowed, ", "))
		}
		if _, dup := out[k.Value]; dup {
			return nil, errAt(k, path+"."+k.Value, "given twice")
		}
		out[k.Value] = n.Content[i+1]
	}
	return out, nil
}

func seq(n *yaml.Node, path string) ([]*yaml.Node, error) {
	if n == nil || n.Kind == yaml.ScalarNode && n.Tag == "!!null" {
		return nil, nil
	}
	if n.Kind != yaml.SequenceNode {
		return nil, errAt(n, path, "want a list, found %s", kind(n))
	}
	return n.Content, nil
}

func str(n *yaml.Node, path string) (string, error) {
	if n.Kind != yaml.ScalarNode || n.Tag == "!!null" {
		return "", errAt(n, path, "want a string, found %s", kind(n))
	}
	return n.Value, nil
}

func dnsLabel(n, parent *yaml.Node, path string) (string, error) {
	if n == nil {
		return "", errAt(parent, path, "required")
	}
	s, err := str(n, path)
	if err != nil {
		return "", err
	}
	if errs := validation.IsDNS1123Label(s); len(errs) > 0 {
		return "", errAt(n, path, "%q: %s", s, strings.Join(errs, "; "))
	}
	return s, nil
}

func port(n, parent *yaml.Node, path string) (uint16, error) {
	if n == nil {
		return 0, errAt(parent, path, "required")
	}
	var v int
	if n.Kind != yaml.ScalarNode || n.Decode(&v) != nil || v < 1 || v > 65535 {
		return 0, errAt(n, path, "%q is not a port number 1-65535 (named target ports are not supported in the inventory)", n.Value)
	}
	return uint16(v), nil
}

func labelMap(n *yaml.Node, path string) (map[string]string, error) {
	if n == nil || n.Kind == yaml.ScalarNode && n.Tag == "!!null" {
		return map[string]string{}, nil
	}
	if n.Kind != yaml.MappingNode {
		return nil, errAt(n, path, "want a mapping of label: value, found %s", kind(n))
	}
	out := make(map[string]string, len(n.Content)/2)
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		if k.Kind != yaml.ScalarNode || v.Kind != yaml.ScalarNode {
			return nil, errAt(k, path, "labels are plain key: value strings")
		}
		if errs := validation.IsQualifiedName(k.Value); len(errs) > 0 {
			return nil, errAt(k, path+"."+k.Value, "bad label key: %s", strings.Join(errs, "; "))
		}
		val := v.Value
		if v.Tag == "!!null" {
			val = ""
		}
		if errs := validation.IsValidLabelValue(val); len(errs) > 0 {
			return nil, errAt(v, path+"."+k.Value, "bad label value %q: %s", val, strings.Join(errs, "; "))
		}
		if _, dup := out[k.Value]; dup {
			return nil, errAt(k, path+"."+k.Value, "given twice")
		}
		out[k.Value] = val
	}
	return out, nil
}

func addrList(n *yaml.Node, path string) ([]netip.Addr, error) {
	items, err := seq(n, path)
	if err != nil {
		return nil, err
	}
	var out []netip.Addr
	for i, it := range items {
		s, err := str(it, fmt.Sprintf("%s[%d]", path, i))
		if err != nil {
			return nil, err
		}
		a, err := netip.ParseAddr(s)
		if err != nil || a.Zone() != "" || a.IsUnspecified() || a.IsMulticast() {
			return nil, errAt(it, fmt.Sprintf("%s[%d]", path, i), "%q is not a unicast IP address", s)
		}
		out = append(out, a.Unmap())
	}
	return out, nil
}

func kind(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		if n.Tag == "!!null" {
			return "nothing"
		}
		return fmt.Sprintf("%q", n.Value)
	}
	return "something else"
}

// sortedKeys is for deterministic output.
func sortedKeys(m map[string]map[string]string) []string {
	k := make([]string, 0, len(m))
	for n := range m {
		k = append(k, n)
	}
	sort.Strings(k)
	return k
}

// checkPodName accepts a pod name or a prefix ending in '*'.
func checkPodName(name string) error {
	prefix, isPrefix := strings.CutSuffix(name, "*")
	if prefix == "" || strings.Contains(prefix, "*") {
		return fmt.Errorf("%q: want a pod name, or a non-empty prefix with '*' only at the end", name)
	}
	if isPrefix {
		if strings.Trim(prefix, "abcdefghijklmnopqrstuvwxyz0123456789.-") != "" {
			return fmt.Errorf("%q: a name prefix may hold only a-z, 0-9, '.' and '-'", name)
		}
		return nil
	}
	if errs := validation.IsDNS1123Subdomain(name); len(errs) > 0 {
		return fmt.Errorf("%q is not a pod name: %s", name, strings.Join(errs, "; "))
	}
	return nil
}
