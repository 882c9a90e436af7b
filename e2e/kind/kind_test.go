package kind

import (
	"bufio"
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer/json"
	"k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/config"
	"github.com/ambit-mesh/ambit/plugin/redirect"
)

// kindConfig is the part of kind's v1alpha4 Cluster this setup relies on
// (sigs.k8s.io/kind is not a dependency; strict decoding still catches a
// misspelt field among these).
type kindConfig struct {
	Kind       string `json:"kind"`
	APIVersion string `json:"apiVersion"`
	Networking struct {
		DisableDefaultCNI bool   `json:"disableDefaultCNI"`
		PodSubnet         string `json:"podSubnet"`
		ServiceSubnet     string `json:"serviceSubnet"`
		IPFamily          string `json:"ipFamily"`
	} `json:"networking"`
	Nodes []struct {
		Role string `json:"role"`
	} `json:"nodes"`
}

func here(t *testing.T) string {
	t.Helper()
	return filepath.Join(testenv.RepoRoot(), "e2e", "kind")
}

func readKindConfig(t *testing.T) kindConfig {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(here(t), "kind-config.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var c kindConfig
	if err := yaml.UnmarshalStrict(b, &c); err != nil {
		t.Fatalf("kind-config.yaml: %v", err)
	}
	return c
}

// scriptVars runs `kind.sh vars`: what the script derives (no tools needed).
func scriptVars(t *testing.T) map[string]string {
	t.Helper()
	out, err := exec.Command("bash", filepath.Join(here(t), "kind.sh"), "vars").Output()
	if err != nil {
		t.Fatalf("kind.sh vars: %v", err)
	}
	vars := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			vars[k] = v
		}
	}
	return vars
}

func mustCIDR(t *testing.T, what, s string) *net.IPNet {
	t.Helper()
	_, n, err := net.ParseCIDR(s)
	if err != nil {
		t.Fatalf("%s %q: %v", what, s, err)
	}
	return n
}

func overlap(a, b *net.IPNet) bool { return a.Contains(b.IP) || b.Contains(a.IP) }

// localClusterRanges are the ranges e2e/kube/cluster.sh uses (its
// SVC_CIDR, POD_CIDR and the HOSTIP/24 bridge), read from the script so a
// change there is checked here too.
func localClusterRanges(t *testing.T) map[string]*net.IPNet {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(testenv.RepoRoot(), "e2e", "kube", "cluster.sh"))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*net.IPNet{}
	for _, m := range regexp.MustCompile(`(?m)^(SVC_CIDR|POD_CIDR|HOSTIP)=(\S+)$`).FindAllStringSubmatch(string(b), -1) {
		v := m[2]
		if m[1] == "HOSTIP" {
			v += "/24"
		}
		out["e2e/kube "+m[1]] = mustCIDR(t, m[1], v)
	}
	if len(out) != 3 {
		t.Fatalf("found %v in e2e/kube/cluster.sh, want SVC_CIDR, POD_CIDR and HOSTIP", out)
	}
	return out
}

func TestKindConfig(t *testing.T) {
	c := readKindConfig(t)
	if c.Kind != "Cluster" || c.APIVersion != "kind.x-k8s.io/v1alpha4" {
		t.Errorf("kind %q apiVersion %q, want a kind.x-k8s.io/v1alpha4 Cluster", c.Kind, c.APIVersion)
	}
	var roles []string
	for _, n := range c.Nodes {
		roles = append(roles, n.Role)
	}
	if !slices.Equal(roles, []string{"control-plane", "worker", "worker"}) {
		t.Errorf("nodes %v, want one control plane and two workers (the cross-node cases pin to the workers)", roles)
	}
	if !c.Networking.DisableDefaultCNI {
		t.Error("kindnet is not disabled: Calico must be the primary CNI")
	}
	if c.Networking.IPFamily != "ipv4" {
		t.Errorf("ipFamily %q: the Calico patch sets only an IPv4 pool", c.Networking.IPFamily)
	}
	pods := mustCIDR(t, "podSubnet", c.Networking.PodSubnet)
	svcs := mustCIDR(t, "serviceSubnet", c.Networking.ServiceSubnet)
	avoid := localClusterRanges(t)
	avoid["documentation range (never used)"] = mustCIDR(t, "", "192.0.2.0/24")
	avoid["Docker's default bridge"] = mustCIDR(t, "", "172.17.0.0/16")
	avoid["kind's usual docker network"] = mustCIDR(t, "", "172.18.0.0/16")
	avoid["serviceSubnet"] = svcs
	for what, r := range avoid {
		if overlap(pods, r) {
			t.Errorf("podSubnet %s overlaps %s %s", pods, what, r)
		}
		if what != "serviceSubnet" && overlap(svcs, r) {
			t.Errorf("serviceSubnet %s overlaps %s %s", svcs, what, r)
		}
	}

	// The script and the cases derive their settings from this file.
	v := scriptVars(t)
	if v["POD_CIDR"] != c.Networking.PodSubnet {
		t.Errorf("kind.sh gives Calico the pool %q, the cluster's podSubnet is %q", v["POD_CIDR"], c.Networking.PodSubnet)
	}
	name := v["NAME"]
	if want := name + "-worker," + name + "-worker2"; v["NODES"] != want {
		t.Errorf("kind.sh pins the cases to %q; kind names the two workers %q", v["NODES"], want)
	}
	// Calico's plain manifest, pinned: it installs into kube-system, which
	// the kind overlay's agents exclude (TestOverlayFitsKind).
	if !regexp.MustCompile(`^v\d+\.\d+\.\d+$`).MatchString(v["CALICO_VERSION"]) ||
		v["CALICO_URL"] != "https://raw.githubusercontent.com/projectcalico/calico/"+v["CALICO_VERSION"]+"/manifests/calico.yaml" {
		t.Errorf("Calico not pinned to a release's plain manifest: %s %s", v["CALICO_VERSION"], v["CALICO_URL"])
	}
}

// makeImage is the image `make image` writes into bin/ambit-image.tar:
// the Makefile's IMAGE default.
func makeImage(t *testing.T) name.Reference {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(testenv.RepoRoot(), "Makefile"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^IMAGE\s*\?=\s*(\S+)\s*$`).FindSubmatch(b)
	if m == nil {
		t.Fatal("Makefile has no `IMAGE ?=` default")
	}
	ref, err := name.ParseReference(string(m[1]))
	if err != nil {
		t.Fatalf("Makefile IMAGE %q: %v", m[1], err)
	}
	return ref
}

func TestOverlayFitsKind(t *testing.T) {
	root := testenv.RepoRoot()
	v := scriptVars(t)
	if v["OVERLAY"] != filepath.Join(root, "manifests", "overlays", "kind") {
		t.Errorf("kind.sh applies %s", v["OVERLAY"])
	}
	if v["IMAGE_TAR"] != filepath.Join(root, "bin", "ambit-image.tar") {
		t.Errorf("kind.sh loads %s, make image writes bin/ambit-image.tar", v["IMAGE_TAR"])
	}
	want := makeImage(t)

	rm, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), v["OVERLAY"])
	if err != nil {
		t.Fatalf("kustomize build manifests/overlays/kind: %v", err)
	}
	dec := json.NewSerializerWithOptions(json.DefaultMetaFactory, scheme.Scheme, scheme.Scheme, json.SerializerOptions{Yaml: true, Strict: true})
	var workloads int
	var ds *appsv1.DaemonSet
	var cfgText string
	for _, res := range rm.Resources() {
		if res.GetKind() == "CustomResourceDefinition" {
			continue
		}
		y, err := res.AsYAML()
		if err != nil {
			t.Fatal(err)
		}
		obj, _, err := dec.Decode(y, nil, nil)
		if err != nil {
			t.Fatalf("%s %s: %v", res.GetKind(), res.GetName(), err)
		}
		var spec *corev1.PodSpec
		switch o := obj.(type) {
		case *appsv1.DaemonSet:
			spec, ds = &o.Spec.Template.Spec, o
		case *appsv1.Deployment:
			spec = &o.Spec.Template.Spec
		case *corev1.ConfigMap:
			if o.Name == "ambit-config" {
				cfgText = o.Data["config.yaml"]
			}
		}
		if spec == nil {
			continue
		}
		workloads++
		for _, c := range append(slices.Clone(spec.InitContainers), spec.Containers...) {
			ref, err := name.ParseReference(c.Image)
			if err != nil {
				t.Errorf("%s %s: image %q: %v", res.GetKind(), res.GetName(), c.Image, err)
				continue
			}
			// The kubelet asks containerd for the normalized name, which
			// is what `kind load image-archive` imported.
			if ref.Name() != want.Name() {
				t.Errorf("%s %s runs %s (%s); make image builds %s", res.GetKind(), res.GetName(), c.Image, ref.Name(), want.Name())
			}
			// No registry: the image must come from the node.
			if c.ImagePullPolicy != corev1.PullNever && c.ImagePullPolicy != corev1.PullIfNotPresent {
				t.Errorf("%s %s pulls with policy %q", res.GetKind(), res.GetName(), c.ImagePullPolicy)
			}
		}
	}
	if workloads != 2 || ds == nil {
		t.Fatalf("rendered %d workloads, want the agent DaemonSet and the CA Deployment", workloads)
	}

	// The overlay replaces the whole config file: it must still parse,
	// serve health where the DaemonSet probes it, and leave Calico alone.
	cfg := config.Default()
	t.Setenv("NODE_NAME", "ambit-e2e-worker")
	if err := config.Parse([]byte(cfgText), &cfg); err != nil {
		t.Fatalf("kind overlay config.yaml: %v", err)
	}
	if err := cfg.Finish(); err != nil {
		t.Fatalf("kind overlay config.yaml: %v", err)
	}
	_, port, err := net.SplitHostPort(cfg.HealthAddr)
	if err != nil {
		t.Fatalf("healthAddr %q: %v", cfg.HealthAddr, err)
	}
	rp := ds.Spec.Template.Spec.Containers[0].ReadinessProbe
	if rp == nil || rp.HTTPGet == nil || rp.HTTPGet.Port.String() != port {
		t.Errorf("kind overlay serves health on %s, the DaemonSet's readiness probe asks %v", port, rp)
	}
	if !slices.Contains(cfg.ExcludedNamespaces, "kube-system") {
		t.Errorf("excludedNamespaces %v: Calico's manifest runs in kube-system, which must stay out of the mesh", cfg.ExcludedNamespaces)
	}
}

// policies decodes networkpolicy.yaml strictly, by name.
func policies(t *testing.T) map[string]*networkingv1.NetworkPolicy {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(here(t), "networkpolicy.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	dec := json.NewSerializerWithOptions(json.DefaultMetaFactory, scheme.Scheme, scheme.Scheme, json.SerializerOptions{Yaml: true, Strict: true})
	out := map[string]*networkingv1.NetworkPolicy{}
	for _, doc := range bytes.Split(b, []byte("\n---\n")) {
		var obj runtime.Object
		if obj, _, err = dec.Decode(doc, nil, nil); err != nil {
			t.Fatalf("networkpolicy.yaml: %v", err)
		}
		np, ok := obj.(*networkingv1.NetworkPolicy)
		if !ok {
			t.Fatalf("networkpolicy.yaml holds a %T", obj)
		}
		if np.Namespace != "" {
			t.Errorf("%s names namespace %s; the cases apply it with -n", np.Name, np.Namespace)
		}
		out[np.Name] = np
	}
	return out
}

func TestNetworkPolicies(t *testing.T) {
	nps := policies(t)
	if len(nps) != 2 {
		t.Fatalf("policies %v, want default-deny and allow-hbone-from-allowed", nps)
	}
	all := func(np *networkingv1.NetworkPolicy) bool {
		return np != nil && len(np.Spec.PodSelector.MatchLabels) == 0 && len(np.Spec.PodSelector.MatchExpressions) == 0 &&
			slices.Equal(np.Spec.PolicyTypes, []networkingv1.PolicyType{networkingv1.PolicyTypeIngress})
	}

	// Default deny: the only sources let in are Ambit's probe SNAT ones.
	deny := nps["default-deny"]
	if !all(deny) {
		t.Fatalf("default-deny must select every pod, ingress only: %+v", deny)
	}
	probe := []string{
		redirect.DefaultProbeSNATv4.String() + "/32",
		redirect.DefaultProbeSNATv6.String() + "/128",
	}
	var from []string
	for _, r := range deny.Spec.Ingress {
		if len(r.Ports) != 0 {
			t.Errorf("default-deny restricts ports %v for the probe source; probes hit any port", r.Ports)
		}
		for _, p := range r.From {
			if p.IPBlock == nil || p.PodSelector != nil || p.NamespaceSelector != nil || len(p.IPBlock.Except) != 0 {
				t.Errorf("default-deny lets in %+v; only the probe source belongs there", p)
				continue
			}
			from = append(from, p.IPBlock.CIDR)
		}
	}
	if !slices.Equal(from, probe) {
		t.Errorf("default-deny lets in %v, want exactly Ambit's probe sources %v", from, probe)
	}

	// HBONE from the chosen namespace, and nothing else.
	allow := nps["allow-hbone-from-allowed"]
	if !all(allow) || len(allow.Spec.Ingress) != 1 {
		t.Fatalf("allow-hbone-from-allowed must select every pod with one ingress rule: %+v", allow)
	}
	r := allow.Spec.Ingress[0]
	if len(r.Ports) != 1 || r.Ports[0].Protocol == nil || *r.Ports[0].Protocol != corev1.ProtocolTCP ||
		r.Ports[0].Port == nil || r.Ports[0].Port.IntValue() != redirect.DefaultHBONEPort || r.Ports[0].EndPort != nil {
		t.Errorf("allow-hbone-from-allowed ports %+v, want exactly TCP %d", r.Ports, redirect.DefaultHBONEPort)
	}
	if len(r.From) != 1 || r.From[0].NamespaceSelector == nil || r.From[0].PodSelector != nil || r.From[0].IPBlock != nil ||
		r.From[0].NamespaceSelector.MatchLabels["e2e-np"] != "allowed" || len(r.From[0].NamespaceSelector.MatchLabels) != 1 {
		t.Errorf("allow-hbone-from-allowed sources %+v, want the namespaces labelled e2e-np=allowed (the NetworkPolicy case labels them)", r.From)
	}

	// They are the documented examples: the docs tell users the same.
	doc, err := os.ReadFile(filepath.Join(testenv.RepoRoot(), "docs", "networkpolicy.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range append(slices.Clone(probe), "{protocol: TCP, port: 15008}") {
		if !bytes.Contains(doc, []byte(s)) {
			t.Errorf("docs/networkpolicy.md does not show %q", s)
		}
	}
}

func TestScriptLint(t *testing.T) {
	script := filepath.Join(here(t), "kind.sh")
	if out, err := exec.Command("bash", "-n", script).CombinedOutput(); err != nil {
		t.Fatalf("bash -n kind.sh: %v\n%s", err, out)
	}
	sc, err := exec.LookPath("shellcheck")
	if err != nil {
		t.Skip("SKIPPED: shellcheck not installed (make deps installs it); bash -n passed")
	}
	if out, err := exec.Command(sc, "-x", script).CombinedOutput(); err != nil {
		t.Fatalf("shellcheck kind.sh: %v\n%s", err, out)
	}
}

// The snippet of Calico's calico.yaml (calico-node env) that kind.sh
// patches, as the v3.2x manifests have it.
const calicoSnippet = `            - name: FELIX_WIREGUARDMTU
              valueFrom:
                configMapKeyRef:
                  name: calico-config
                  key: veth_mtu
            # The default IPv4 pool to create on startup if none exists. Pod IPs will be
            # chosen from this range. Changing this value after installation will have
            # no effect. This should fall within ` + "`--cluster-cidr`" + `.
            # - name: CALICO_IPV4POOL_CIDR
            #   value: "192.168.0.0/16"
            # Disable file logging so ` + "`kubectl logs`" + ` works.
            - name: CALICO_DISABLE_FILE_LOGGING
              value: "true"
`

func calicoPatch(t *testing.T, cidr, in string) (string, string, error) {
	t.Helper()
	cmd := exec.Command("bash", filepath.Join(here(t), "kind.sh"), "calico-patch", cidr)
	cmd.Stdin = strings.NewReader(in)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	return out.String(), errb.String(), err
}

func TestCalicoPatch(t *testing.T) {
	pod := readKindConfig(t).Networking.PodSubnet
	out, stderr, err := calicoPatch(t, pod, calicoSnippet)
	if err != nil {
		t.Fatalf("calico-patch: %v %s", err, stderr)
	}
	// The env list must still be YAML, now with the pool and Felix's
	// loose-RPF switch as real entries.
	var env []corev1.EnvVar
	if err := yaml.UnmarshalStrict([]byte(out), &env); err != nil {
		t.Fatalf("patched env is not a valid env list: %v\n%s", err, out)
	}
	got := map[string]string{}
	for _, e := range env {
		got[e.Name] = e.Value
	}
	if got["CALICO_IPV4POOL_CIDR"] != pod || got["FELIX_IGNORELOOSERPF"] != "true" || got["CALICO_DISABLE_FILE_LOGGING"] != "true" || len(env) != 4 {
		t.Errorf("patched env %v, want the pool %s, FELIX_IGNORELOOSERPF and the untouched entries", got, pod)
	}
	if strings.Contains(out, "192.168.0.0/16") {
		t.Error("Calico's default pool survived the patch")
	}

	// A manifest whose layout changed must stop the run, not install a
	// pool outside the pod subnet.
	noEntry := strings.ReplaceAll(calicoSnippet, "# - name: CALICO_IPV4POOL_CIDR", "# gone")
	if _, stderr, err := calicoPatch(t, pod, noEntry); err == nil || !strings.Contains(stderr, "CALICO_IPV4POOL_CIDR") {
		t.Errorf("manifest without the pool entry: err %v, stderr %q; want a failure naming CALICO_IPV4POOL_CIDR", err, stderr)
	}
	if _, stderr, err := calicoPatch(t, "", calicoSnippet); err == nil || !strings.Contains(stderr, "CIDR") {
		t.Errorf("no CIDR: err %v, stderr %q", err, stderr)
	}
}

// TestPreflight runs `kind.sh preflight` with a PATH holding only what the
// test puts there: it must name what is missing, notice an engine that
// does not answer, and pass when everything answers.
func TestPreflight(t *testing.T) {
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Fatal(err)
	}
	bin := t.TempDir()
	// What the script itself needs from the system.
	for _, tool := range []string{"dirname", "awk", "head", "cat"} {
		p, err := exec.LookPath(tool)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(p, filepath.Join(bin, tool)); err != nil {
			t.Fatal(err)
		}
	}
	fake := func(name, body string) {
		if err := os.WriteFile(filepath.Join(bin, name), []byte("#!"+bash+"\n"+body+"\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	run := func(env ...string) (string, error) {
		cmd := exec.Command(bash, filepath.Join(here(t), "kind.sh"), "preflight")
		cmd.Env = append([]string{"PATH=" + bin, "HOME=" + t.TempDir()}, env...)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}

	out, err := run()
	if err == nil || !strings.Contains(out, "missing: kind kubectl docker go curl") {
		t.Errorf("nothing installed: err %v, output %q", err, out)
	}
	fake("kind", `echo "kind v0.0.0-test"`)
	fake("kubectl", `echo "gitVersion: v0.0.0-test"`)
	fake("go", "exit 0")
	fake("curl", "exit 0")
	out, err = run()
	if err == nil || !strings.Contains(out, "missing: docker.") {
		t.Errorf("docker missing: err %v, output %q", err, out)
	}
	fake("docker", `[ "$1" = info ] && { echo "Cannot connect to the Docker daemon" >&2; exit 1; }; exit 0`)
	out, err = run()
	if err == nil || !strings.Contains(out, "does not answer") {
		t.Errorf("docker without an engine: err %v, output %q", err, out)
	}
	fake("docker", "exit 0")
	if out, err = run(); err != nil || !strings.Contains(out, "kind v0.0.0-test") {
		t.Errorf("all tools there: err %v, output %q", err, out)
	}
	// podman as kind's provider: checked instead of docker, said untested.
	out, err = run("KIND_EXPERIMENTAL_PROVIDER=podman")
	if err == nil || !strings.Contains(out, "missing: podman") {
		t.Errorf("podman provider without podman: err %v, output %q", err, out)
	}
	fake("podman", "exit 0")
	if out, err = run("KIND_EXPERIMENTAL_PROVIDER=podman"); err != nil || !strings.Contains(out, "untested") {
		t.Errorf("podman provider: err %v, output %q", err, out)
	}
}
