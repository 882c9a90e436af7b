package manifests

import (
	stdjson "encoding/json"
	"fmt"
	"net"
	"path"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer/json"
	"k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"

	"github.com/ambit-mesh/ambit/node-agent/config"
	"github.com/ambit-mesh/ambit/node-agent/install"
)

const ns = "ambit-system"

// rendered is one kustomization's output, decoded strictly into the
// Kubernetes types (an unknown or misspelt field fails the test).
type rendered struct {
	objs   map[string]runtime.Object // kind/namespace/name
	crds   []string
	kinds  []string
	images []string
}

func render(t testing.TB, dir string) *rendered {
	t.Helper()
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	rm, err := k.Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	dec := json.NewSerializerWithOptions(json.DefaultMetaFactory, scheme.Scheme, scheme.Scheme, json.SerializerOptions{Yaml: true, Strict: true})
	r := &rendered{objs: map[string]runtime.Object{}}
	for _, res := range rm.Resources() {
		y, err := res.AsYAML()
		if err != nil {
			t.Fatal(err)
		}
		kind := res.GetKind()
		r.kinds = append(r.kinds, kind)
		if kind == "CustomResourceDefinition" {
			r.crds = append(r.crds, res.GetName())
			continue
		}
		obj, _, err := dec.Decode(y, nil, nil)
		if err != nil {
			t.Fatalf("%s %s does not decode strictly: %v", kind, res.GetName(), err)
		}
		key := kind + "/" + res.GetNamespace() + "/" + res.GetName()
		if _, dup := r.objs[key]; dup {
			t.Fatalf("duplicate %s", key)
		}
		r.objs[key] = obj
	}
	return r
}

func get[T runtime.Object](t testing.TB, r *rendered, kind, namespace, name string) T {
	t.Helper()
	o, ok := r.objs[kind+"/"+namespace+"/"+name]
	if !ok {
		t.Fatalf("%s %s/%s not rendered; have %v", kind, namespace, name, keys(r.objs))
	}
	v, ok := o.(T)
	if !ok {
		t.Fatalf("%s is a %T", kind, o)
	}
	return v
}

func keys(m map[string]runtime.Object) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func root(t testing.TB) string {
	abs, err := filepath.Abs(".")
	if err != nil {
		t.Fatal(err)
	}
	return abs
}

func TestAgentDaemonSet(t *testing.T) {
	r := render(t, root(t))
	ds := get[*appsv1.DaemonSet](t, r, "DaemonSet", ns, "ambit-agent")
	s := ds.Spec.Template.Spec
	if !s.HostNetwork || s.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
		t.Error("agent must run on the host network with ClusterFirstWithHostNet DNS")
	}
	if s.PriorityClassName != "system-node-critical" {
		t.Errorf("priorityClassName %q", s.PriorityClassName)
	}
	if !slices.ContainsFunc(s.Tolerations, func(tl corev1.Toleration) bool {
		return tl.Key == "" && tl.Operator == corev1.TolerationOpExists && tl.Effect == ""
	}) {
		t.Errorf("does not tolerate every taint: %+v", s.Tolerations)
	}
	// Above all the startup taint it removes: an agent that could not
	// start on a node registered with it would leave the node tainted
	// for good (its tolerations may be narrowed in an overlay).
	if key := agentConfig(t, r).ReadyTaint; key != "" {
		for _, eff := range []corev1.TaintEffect{corev1.TaintEffectNoSchedule, corev1.TaintEffectNoExecute} {
			if !slices.ContainsFunc(s.Tolerations, func(tl corev1.Toleration) bool {
				// The scheduler's rule for a taint with no value.
				return (tl.Key == "" || tl.Key == key) && (tl.Effect == "" || tl.Effect == eff) &&
					(tl.Operator == corev1.TolerationOpExists || tl.Key != "" && tl.Value == "")
			}) {
				t.Errorf("the agent does not tolerate its own startup taint %s:%s: %+v", key, eff, s.Tolerations)
			}
		}
	} else {
		t.Error("the manifests' config turns the startup taint off (readyTaint empty)")
	}
	// Hitless upgrade: the new agent must run beside the old one before
	// the old one stops, so surge and never an unavailable node.
	u := ds.Spec.UpdateStrategy
	if u.Type != appsv1.RollingUpdateDaemonSetStrategyType || u.RollingUpdate == nil ||
		u.RollingUpdate.MaxSurge == nil || u.RollingUpdate.MaxSurge.String() != "1" ||
		u.RollingUpdate.MaxUnavailable == nil || u.RollingUpdate.MaxUnavailable.String() != "0" {
		t.Errorf("update strategy %+v, want maxSurge 1, maxUnavailable 0", u)
	}
	// The readiness probe reaches whichever agent holds the shared port;
	// only an exec startup probe answers for the new container itself,
	// and it must name the file the agent writes.
	c0 := s.Containers[0]
	if sp := c0.StartupProbe; sp == nil || sp.Exec == nil || !slices.Contains(sp.Exec.Command, "probe") {
		t.Errorf("no exec startup probe (ambit-agent probe): %+v", sp)
	} else {
		var file string
		for _, a := range c0.Args {
			if v, ok := strings.CutPrefix(a, "--instance-file="); ok {
				file = v
			}
		}
		if file == "" || !slices.Contains(sp.Exec.Command, "--instance-file="+file) {
			t.Errorf("startup probe %v and agent args %v disagree on --instance-file", sp.Exec.Command, c0.Args)
		}
		if !strings.HasPrefix(file, "/tmp/") || !slices.ContainsFunc(c0.VolumeMounts, func(m corev1.VolumeMount) bool { return m.MountPath == "/tmp" }) {
			t.Errorf("instance file %q must live in the pod's private /tmp volume", file)
		}
	}
	// A declared port on a host-network pod is a host port: the surge pod
	// could not be scheduled beside the old one.
	for _, c := range append(slices.Clone(s.InitContainers), s.Containers...) {
		if len(c.Ports) != 0 {
			t.Errorf("container %s declares ports %v: host ports block the surge pod", c.Name, c.Ports)
		}
	}
	if g := s.TerminationGracePeriodSeconds; g == nil || *g < 25 || *g > 60 {
		t.Errorf("terminationGracePeriodSeconds %v", g)
	}
	if ds.Spec.Template.Labels["ambit.dev/dataplane-mode"] != "none" {
		t.Error("agent pods are not opted out of the mesh")
	}
	sel, _ := metaSelector(ds.Spec.Selector.MatchLabels)
	if !sel.Matches(labels.Set(ds.Spec.Template.Labels)) {
		t.Error("selector does not match the template")
	}
	if len(s.Containers) != 2 || s.Containers[0].Name != "agent" || s.Containers[1].Name != "keeper" || len(s.InitContainers) != 0 {
		t.Fatalf("want the agent (installer in-process) and the keeper, have %d + %d init", len(s.Containers), len(s.InitContainers))
	}
	checkKeeper(t, s, agentConfig(t, r))
	c := s.Containers[0]
	sc := c.SecurityContext
	if sc == nil || sc.Capabilities == nil {
		t.Fatal("no securityContext/capabilities")
	}
	if sc.Privileged != nil && *sc.Privileged {
		t.Error("agent is privileged")
	}
	if sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation {
		t.Error("allowPrivilegeEscalation=false with CAP_SYS_ADMIN is refused by the API server")
	}
	var add []string
	for _, c := range sc.Capabilities.Add {
		add = append(add, string(c))
	}
	sort.Strings(add)
	if want := []string{"DAC_OVERRIDE", "NET_ADMIN", "NET_RAW", "SETUID", "SYS_ADMIN", "SYS_PTRACE"}; !slices.Equal(add, want) {
		t.Errorf("capabilities add %v, want exactly %v", add, want)
	}
	if !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("capabilities drop %v, want ALL", sc.Capabilities.Drop)
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Error("root filesystem is writable")
	}

	// Host mounts: path on the host -> where and how it is mounted.
	vols := map[string]corev1.Volume{}
	for _, v := range s.Volumes {
		vols[v.Name] = v
	}
	mounts := map[string]corev1.VolumeMount{}
	for _, m := range c.VolumeMounts {
		v, ok := vols[m.Name]
		if !ok {
			t.Fatalf("mount %s has no volume", m.Name)
		}
		if v.HostPath != nil {
			mounts[v.HostPath.Path] = m
		}
	}
	wantHost := map[string]struct {
		at       string
		ro       bool
		propagat corev1.MountPropagationMode
	}{
		"/opt/cni/bin":   {at: install.DefaultCNIBinDir},
		"/etc/cni/net.d": {at: install.DefaultCNIConfDir},
		"/var/run/ambit": {at: "/var/run/ambit"},
		"/var/run/netns": {at: "/var/run/netns", ro: true, propagat: corev1.MountPropagationHostToContainer},
		"/proc":          {at: "/host/proc", ro: true},
	}
	for host, w := range wantHost {
		m, ok := mounts[host]
		if !ok {
			t.Errorf("host path %s not mounted", host)
			continue
		}
		if m.MountPath != w.at || m.ReadOnly != w.ro {
			t.Errorf("host %s mounted at %s ro=%v, want %s ro=%v", host, m.MountPath, m.ReadOnly, w.at, w.ro)
		}
		if w.propagat != "" && (m.MountPropagation == nil || *m.MountPropagation != w.propagat) {
			t.Errorf("host %s propagation %v, want %s", host, m.MountPropagation, w.propagat)
		}
	}
	if len(mounts) != len(wantHost) {
		t.Errorf("unexpected host mounts: %v", mounts)
	}

	// The projected token the CA accepts (the API server's own is
	// projected too: TestAPITokenOnlyWhereUsed).
	var audiences []string
	for _, v := range s.Volumes {
		if v.Projected != nil {
			for _, src := range v.Projected.Sources {
				if src.ServiceAccountToken != nil {
					audiences = append(audiences, src.ServiceAccountToken.Audience)
				}
			}
		}
	}
	if !slices.Contains(audiences, "ambit-ca") {
		t.Errorf("projected token audiences %q, want one for ambit-ca", audiences)
	}

	// Probes hit the address the config serves health on.
	cfg := agentConfig(t, r)
	_, port, _ := net.SplitHostPort(cfg.HealthAddr)
	for name, p := range map[string]*corev1.Probe{"/readyz": c.ReadinessProbe, "/healthz": c.LivenessProbe} {
		if p == nil || p.HTTPGet == nil || p.HTTPGet.Path != name || p.HTTPGet.Port.String() != port {
			t.Errorf("probe %s: %+v (health served on port %s)", name, p, port)
		}
	}
	// The config's paths are on the mounts the plugin on the host shares.
	for field, p := range map[string]string{"socket": cfg.Socket, "stateDir": cfg.StateDir, "snapshotFile": cfg.SnapshotFile} {
		if !strings.HasPrefix(p, "/var/run/ambit") {
			t.Errorf("config %s %s is not on the /var/run/ambit host mount", field, p)
		}
	}
	// Every path the agent's configuration names (including the ones it
	// only has defaults for: CNI dirs, CA token and roots) must be on a
	// mount of the container: its root filesystem is read-only and holds
	// none of them.
	var fields map[string]any
	raw, _ := stdjson.Marshal(cfg)
	stdjson.Unmarshal(raw, &fields)
	for k, v := range fields {
		p, ok := v.(string)
		if !ok || !strings.HasPrefix(p, "/") {
			continue
		}
		if !slices.ContainsFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool {
			return p == m.MountPath || strings.HasPrefix(p, strings.TrimSuffix(m.MountPath, "/")+"/")
		}) {
			t.Errorf("config %s = %s is on no volume mount of the agent", k, p)
		}
	}
	if cfg.ProcRoot != "/host/proc" {
		t.Errorf("config procRoot %s, want the /host/proc mount", cfg.ProcRoot)
	}
	if cfg.Socket != install.DefaultAgentSocket {
		t.Errorf("agent listens on %s, the installer tells the plugin %s", cfg.Socket, install.DefaultAgentSocket)
	}
	// The config file is where the container reads it.
	if !slices.Contains(c.Args, "--config=/etc/ambit/config.yaml") {
		t.Errorf("args %v do not load /etc/ambit/config.yaml", c.Args)
	}
	var nodeEnv bool
	for _, e := range c.Env {
		if e.Name == "NODE_NAME" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName" {
			nodeEnv = true
		}
	}
	if !nodeEnv {
		t.Error("NODE_NAME is not the pod's spec.nodeName")
	}
	sa := get[*corev1.ServiceAccount](t, r, "ServiceAccount", ns, s.ServiceAccountName)
	_ = sa
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := stdjson.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func metaSelector(m map[string]string) (labels.Selector, error) {
	return labels.SelectorFromSet(m), nil
}

// The ConfigMap is the agent's configuration file: it must parse strictly
// with the agent's own parser and validate.
func agentConfig(t *testing.T, r *rendered) config.Config {
	t.Helper()
	cm := get[*corev1.ConfigMap](t, r, "ConfigMap", ns, "ambit-config")
	t.Setenv("NODE_NAME", "node-1")
	cfg := config.Default()
	if err := config.Parse([]byte(cm.Data["config.yaml"]), &cfg); err != nil {
		t.Fatalf("ambit-config config.yaml: %v", err)
	}
	if err := cfg.Finish(); err != nil {
		t.Fatalf("ambit-config config.yaml: %v", err)
	}
	if cfg.Source != config.SourceKubernetes {
		t.Errorf("source %q", cfg.Source)
	}
	return cfg
}

type rule struct{ group, resource, verb, name string }

func rules(rs []rbacv1.PolicyRule) map[rule]bool {
	out := map[rule]bool{}
	for _, r := range rs {
		names := r.ResourceNames
		if len(names) == 0 {
			names = []string{""}
		}
		for _, g := range r.APIGroups {
			for _, res := range r.Resources {
				for _, v := range r.Verbs {
					for _, n := range names {
						out[rule{g, res, v, n}] = true
					}
				}
			}
		}
	}
	return out
}

func expand(spec string) map[rule]bool {
	// "group/resource[name]:verb,verb; ..."
	out := map[rule]bool{}
	for _, part := range strings.Split(spec, ";") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		gr, verbs, _ := strings.Cut(part, ":")
		g, res, _ := strings.Cut(gr, "/")
		name := ""
		if i := strings.Index(res, "["); i >= 0 {
			name = strings.TrimSuffix(res[i+1:], "]")
			res = res[:i]
		}
		for _, v := range strings.Split(verbs, ",") {
			out[rule{g, res, v, name}] = true
		}
	}
	return out
}

func diff(got, want map[rule]bool) string {
	var b strings.Builder
	for r := range got {
		if !want[r] {
			fmt.Fprintf(&b, "extra %+v; ", r)
		}
	}
	for r := range want {
		if !got[r] {
			fmt.Fprintf(&b, "missing %+v; ", r)
		}
	}
	return b.String()
}

// Least privilege: exactly these verbs, nothing more (no wildcards, no
// secrets for the agent, the CA's secrets only in its namespace).
func TestRBAC(t *testing.T) {
	r := render(t, root(t))
	agent := get[*rbacv1.ClusterRole](t, r, "ClusterRole", "", "ambit-agent")
	wantAgent := expand(`/pods:get,list,watch,patch; /pods/status:patch; /namespaces:get,list,watch; /services:get,list,watch;
		discovery.k8s.io/endpointslices:get,list,watch; /nodes:get,list,watch,patch; /events:create,patch;
		ambit.dev/authorizationpolicies:get,list,watch; ambit.dev/inboundmodes:get,list,watch;
		ambit.dev/authorizationpolicies/status:update; ambit.dev/inboundmodes/status:update;
		security.istio.io/authorizationpolicies:get,list,watch; security.istio.io/peerauthentications:get,list,watch`)
	if d := diff(rules(agent.Rules), wantAgent); d != "" {
		t.Errorf("agent ClusterRole: %s", d)
	}
	ca := get[*rbacv1.ClusterRole](t, r, "ClusterRole", "", "ambit-ca")
	if d := diff(rules(ca.Rules), expand(`authentication.k8s.io/tokenreviews:create; /pods:get,list,watch`)); d != "" {
		t.Errorf("CA ClusterRole: %s", d)
	}
	caRole := get[*rbacv1.Role](t, r, "Role", ns, "ambit-ca")
	if d := diff(rules(caRole.Rules), expand(`/secrets[ambit-ca]:get; /secrets:create; /configmaps[ambit-ca-root]:get,update; /configmaps:create`)); d != "" {
		t.Errorf("CA Role: %s", d)
	}
	// Every binding points at a rendered role and service account.
	for key, o := range r.objs {
		var ref rbacv1.RoleRef
		var subs []rbacv1.Subject
		switch b := o.(type) {
		case *rbacv1.ClusterRoleBinding:
			ref, subs = b.RoleRef, b.Subjects
		case *rbacv1.RoleBinding:
			ref, subs = b.RoleRef, b.Subjects
		default:
			continue
		}
		roleNS := ""
		if ref.Kind == "Role" {
			roleNS = ns
		}
		if _, ok := r.objs[ref.Kind+"/"+roleNS+"/"+ref.Name]; !ok {
			t.Errorf("%s refers to missing %s %s", key, ref.Kind, ref.Name)
		}
		for _, s := range subs {
			if _, ok := r.objs["ServiceAccount/"+s.Namespace+"/"+s.Name]; s.Kind != "ServiceAccount" || !ok {
				t.Errorf("%s binds missing subject %+v", key, s)
			}
		}
	}
}

func TestCA(t *testing.T) {
	r := render(t, root(t))
	d := get[*appsv1.Deployment](t, r, "Deployment", ns, "ambit-ca")
	if d.Spec.Replicas == nil || *d.Spec.Replicas != 2 {
		t.Errorf("CA replicas %v, want 2", d.Spec.Replicas)
	}
	tl := labels.Set(d.Spec.Template.Labels)
	if tl["ambit.dev/dataplane-mode"] != "none" {
		t.Error("CA pods are not opted out of the mesh")
	}
	pdb := get[*policyv1.PodDisruptionBudget](t, r, "PodDisruptionBudget", ns, "ambit-ca")
	if sel, _ := metaSelector(pdb.Spec.Selector.MatchLabels); !sel.Matches(tl) {
		t.Error("PDB does not select the CA pods")
	}
	svc := get[*corev1.Service](t, r, "Service", ns, "ambit-ca")
	if sel, _ := metaSelector(svc.Spec.Selector); !sel.Matches(tl) {
		t.Error("Service does not select the CA pods")
	}
	c := d.Spec.Template.Spec.Containers[0]
	if len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].Port != 15012 || !slices.ContainsFunc(c.Ports, func(p corev1.ContainerPort) bool {
		return p.Name == svc.Spec.Ports[0].TargetPort.String() && p.ContainerPort == 15012
	}) {
		t.Errorf("Service ports %+v do not reach the CA's 15012", svc.Spec.Ports)
	}
	if d.Spec.Template.Spec.ServiceAccountName != "ambit-ca" || c.Args[0] != "ca" {
		t.Error("CA runs as the wrong account or command")
	}
	if sc := c.SecurityContext; sc == nil || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation || len(sc.Capabilities.Add) != 0 {
		t.Error("the CA needs no privilege and must have none")
	}
}

func TestNamespaceAndCRDs(t *testing.T) {
	r := render(t, root(t))
	n := get[*corev1.Namespace](t, r, "Namespace", "", ns)
	if n.Labels["pod-security.kubernetes.io/enforce"] != "privileged" {
		t.Error("namespace would reject the agent under a baseline Pod Security default")
	}
	for key := range r.objs {
		kind, rest, _ := strings.Cut(key, "/")
		objNS, _, _ := strings.Cut(rest, "/")
		clusterScoped := slices.Contains([]string{"Namespace", "ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}, kind)
		if !clusterScoped && objNS != ns {
			t.Errorf("%s is not in %s", key, ns)
		}
	}
	// Critical priority classes outside kube-system need a quota on
	// some providers; it must cover the classes our pods use.
	q := get[*corev1.ResourceQuota](t, r, "ResourceQuota", ns, "ambit-critical-pods")
	classes := q.Spec.ScopeSelector.MatchExpressions[0].Values
	for _, pc := range []string{
		get[*appsv1.DaemonSet](t, r, "DaemonSet", ns, "ambit-agent").Spec.Template.Spec.PriorityClassName,
		get[*appsv1.Deployment](t, r, "Deployment", ns, "ambit-ca").Spec.Template.Spec.PriorityClassName,
	} {
		if !slices.Contains(classes, pc) {
			t.Errorf("priority class %s not covered by the ResourceQuota %v", pc, classes)
		}
	}
	if len(r.crds) < 2 {
		t.Errorf("policy CRDs not included: %v", r.crds)
	}
}

func TestOverlays(t *testing.T) {
	base := render(t, root(t))
	kind := render(t, filepath.Join(root(t), "overlays", "kind"))
	ds := get[*appsv1.DaemonSet](t, kind, "DaemonSet", ns, "ambit-agent")
	for _, c := range ds.Spec.Template.Spec.Containers {
		if c.ImagePullPolicy != corev1.PullNever {
			t.Errorf("kind overlay: container %s must use the image loaded into the node", c.Name)
		}
	}
	// The overlay replaces the whole config.yaml: it must still point the
	// agent at the keeper container the DaemonSet runs, or a kill -9 of
	// the agent refuses connections on kind while the keeper idles.
	kcfg := agentConfig(t, kind)
	checkKeeper(t, ds.Spec.Template.Spec, kcfg)
	// Beyond the keeper: any field the overlay drops silently takes its
	// default instead of the base's value.
	bcfg := agentConfig(t, base)
	kcfg.ExcludedNamespaces, kcfg.LogLevel, kcfg.LogFormat = bcfg.ExcludedNamespaces, bcfg.LogLevel, bcfg.LogFormat
	if b, k := mustJSON(t, bcfg), mustJSON(t, kcfg); b != k {
		t.Errorf("kind overlay's config.yaml differs from the base's beyond excludedNamespaces and logs:\nbase %s\nkind %s", b, k)
	}
	if len(kind.objs) != len(base.objs) {
		t.Errorf("kind overlay renders %d objects, base %d", len(kind.objs), len(base.objs))
	}
	un := render(t, filepath.Join(root(t), "overlays", "uninstall"))
	uds := get[*appsv1.DaemonSet](t, un, "DaemonSet", ns, "ambit-agent")
	if n := len(uds.Spec.Template.Spec.Containers); n != 1 {
		t.Errorf("uninstall overlay runs %d containers, want the uninstaller alone (no keeper)", n)
	}
	c := uds.Spec.Template.Spec.Containers[0]
	if len(c.Args) == 0 || c.Args[0] != "uninstall" || !slices.Contains(c.Args, "--unenroll-all") {
		t.Errorf("uninstall overlay args %v", c.Args)
	}
	if c.ReadinessProbe != nil || c.StartupProbe != nil || c.LivenessProbe != nil {
		t.Error("uninstaller has a probe it cannot answer")
	}
	// Uninstall replaces the agents at once; a surge would run the
	// uninstaller beside a still-serving agent.
	if ru := uds.Spec.UpdateStrategy.RollingUpdate; ru == nil || ru.MaxSurge == nil || ru.MaxSurge.String() != "0" {
		t.Errorf("uninstall overlay strategy %+v, want maxSurge 0", ru)
	}
}

// checkKeeper: the keeper container holds listeners for the agent, so it
// must listen where the agent's keeperSocket points, on a volume only
// this pod's two containers share, as the agent's user, and need nothing
// else (no capability, no host path).
func checkKeeper(t *testing.T, s corev1.PodSpec, cfg config.Config) {
	t.Helper()
	agent, k := s.Containers[0], s.Containers[1]
	sock := cfg.KeeperSocket
	if sock == "" || !slices.Contains(k.Args, "--socket="+sock) {
		t.Fatalf("keeper args %v do not listen at the agent's keeperSocket %q", k.Args, sock)
	}
	dir := path.Dir(sock)
	vol := func(c corev1.Container) string {
		for _, m := range c.VolumeMounts {
			if m.MountPath == dir {
				return m.Name
			}
		}
		return ""
	}
	if vol(agent) == "" || vol(agent) != vol(k) {
		t.Fatalf("agent and keeper do not share %s (mounts %q, %q)", dir, vol(agent), vol(k))
	}
	for _, v := range s.Volumes {
		if v.Name == vol(k) && v.EmptyDir == nil {
			t.Errorf("keeper volume %s is not an emptyDir: a surge pod's keeper would share it", v.Name)
		}
	}
	if len(k.VolumeMounts) != 1 {
		t.Errorf("keeper mounts %v, want only its socket's volume", k.VolumeMounts)
	}
	sc, asc := k.SecurityContext, agent.SecurityContext
	if sc == nil || sc.Capabilities == nil || len(sc.Capabilities.Add) != 0 || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("keeper capabilities %+v, want none", sc)
	}
	if sc == nil || asc == nil || sc.RunAsUser == nil || asc.RunAsUser == nil || *sc.RunAsUser != *asc.RunAsUser {
		t.Error("keeper and agent must run as the same user (the keeper serves only its own)")
	}
	if k.Image != agent.Image || len(k.Ports) != 0 {
		t.Errorf("keeper image %q (agent %q), ports %v", k.Image, agent.Image, k.Ports)
	}
}
