package config

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/yaml"
)

// Source names where the agent learns about pods and namespaces.
const (
	SourceKubernetes = "kubernetes"
	SourceInventory  = "inventory"
)

// DefaultEnrollLabel is the label (on a namespace or a pod) that enrolls
// pods; its value "ambient" opts in, "none" on a pod opts out.
const DefaultEnrollLabel = "ambit.dev/dataplane-mode"

// DefaultReadyTaint is the startup taint's key (readytaint.DefaultKey).
const DefaultReadyTaint = "ambit.dev/agent-not-ready"

// Duration is a time.Duration written as "10s", "1m30s" in the file.
type Duration struct {
	time.Duration
	// bad keeps an unparsable value (its JSON text) so Validate can name
	// the field: an error returned from here reaches the operator
	// without the key it is about.
	bad string
}

// MarshalJSON writes the Go duration syntax.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(d.String()) }

// UnmarshalJSON accepts "10s" style strings, and a bare 0 (as
// time.ParseDuration does); null leaves the value as it was.
func (d *Duration) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		return nil
	}
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		s = string(b) // a number: "0" parses, "25" lacks its unit
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		d.bad = string(b)
		return nil
	}
	d.Duration, d.bad = v, ""
	return nil
}

// Config is the whole agent configuration. JSON names are the file's keys.
type Config struct {
	// NodeName is this node; pods elsewhere are not ours. Default: $NODE_NAME,
	// else the host name.
	NodeName string `json:"nodeName,omitempty"`
	// Source is "kubernetes" (client-go informers) or "inventory" (a static
	// file). Default kubernetes when running in a cluster, inventory when
	// InventoryFile is set.
	Source string `json:"source,omitempty"`
	// InventoryFile is the static inventory (Source inventory).
	InventoryFile string `json:"inventoryFile,omitempty"`
	// Kubeconfig for Source kubernetes outside a pod; empty = in-cluster.
	Kubeconfig string `json:"kubeconfig,omitempty"`
	// KubeAPIQPS and KubeAPIBurst are the client-side rate limit of the
	// agent's Kubernetes clients (client-go's token bucket; its own
	// default, 5 and 10, made the 50th of 50 pods started at once wait
	// 8 s for its ambit.dev/redirection annotation, during which other
	// nodes reach it in plaintext). Default 50 and 100, the kubelet's own
	// defaults (kubeAPIQPS/kubeAPIBurst): a node starting as many pods as
	// it may hold (110 by default) gets every annotation written at once,
	// and a refill of 50/s re-checks a full node quickly after a restart
	// (the agent writes only annotations that differ). The API server is
	// protected by API Priority and Fairness, not by this limit: the
	// agent's requests queue in their priority level, and client-go
	// retries a 429.
	KubeAPIQPS   float64 `json:"kubeAPIQPS,omitempty"`
	KubeAPIBurst int     `json:"kubeAPIBurst,omitempty"`
	// StateDir holds what survives an agent restart (pod records, the
	// enrollment snapshot, local CA files in static mode).
	StateDir string `json:"stateDir,omitempty"`
	// Socket is the plugin ↔ agent unix socket. Default
	// <StateDir>/cni.sock (/var/run/ambit/cni.sock).
	Socket string `json:"socket,omitempty"`
	// SnapshotFile is where the enrollment snapshot for the plugin is
	// written (read by ambit-cni when the agent is down). Default
	// <StateDir>/enrollment-snapshot.json, where the plugin looks.
	SnapshotFile string `json:"snapshotFile,omitempty"`
	// KeeperSocket is where `ambit-agent keeper` (a second container of
	// the agent's pod) listens; the agent hands it copies of every pod's
	// listeners so a crash does not close them (node-agent/keeper).
	// Empty: no keeper.
	KeeperSocket string `json:"keeperSocket,omitempty"`
	// HealthAddr serves /healthz, /readyz and /metrics ("" disables).
	HealthAddr string `json:"healthAddr"`
	// ProcRoot is the host's /proc (mounted e.g. at /host/proc in a pod),
	// used only by the netns discovery fallback.
	ProcRoot string `json:"procRoot,omitempty"`

	// EnrollLabel is the enrollment label key.
	EnrollLabel string `json:"enrollLabel,omitempty"`
	// ExcludedNamespaces are never enrolled, whatever their labels.
	ExcludedNamespaces []string `json:"excludedNamespaces"`
	// TrustDomain of workload identities.
	TrustDomain string `json:"trustDomain,omitempty"`
	// RedirectBackend is the rule engine the agent uses when it installs
	// redirection itself (live enrollment, repair): auto, nftables,
	// iptables, iptables-legacy or iptables-nft.
	RedirectBackend string `json:"redirectBackend,omitempty"`
	// IPv6 is "auto" or "on" (rules for both families in every pod,
	// whatever its addresses: an IPv4-only pod's link-local IPv6 is
	// captured too) or "off" (no IPv6 rules, in pods or on the host: for
	// hosts without IPv6 NAT; turn IPv6 off in the pods as well).
	IPv6 string `json:"ipv6,omitempty"`

	// MaxProcs is how many threads run the agent's Go code at once
	// (GOMAXPROCS). 0: from one up to half the CPUs the process may use
	// (at least two where it may use two or more) with the agent's load
	// (internal/maxprocs says why); a value, or a GOMAXPROCS environment
	// variable, is fixed; the variable
	// overrides it.
	MaxProcs int `json:"maxProcs,omitempty"`
	// ExclusiveListeners makes the agent own its listeners in the pods
	// as podnet.ListenerUID (needs CAP_SETUID), so no application of a
	// pod, even one running as root with SO_REUSEPORT, can join their
	// reuseport group and take a share of the connections. Off by
	// default in this release: an agent older than session 10 cannot
	// join such a group (the kernel requires the same owner), so a
	// rollback to it under the DaemonSet's surge would leave the pods
	// the newer agent enrolled with nothing listening (docs/upgrade.md).
	// Turn it on once no node will go back to an older agent. Off, each
	// listener is still checked after its bind, and an application
	// already on the port fails the enrollment (docs/agent.md).
	ExclusiveListeners bool `json:"exclusiveListeners,omitempty"`
	// MaxConnections is the agent's budget of proxied connections, all
	// its pods together: below 3/4 of it nothing is refused, however
	// busy a pod is; at or past 3/4, a pod holding the water level or
	// more (the max-min fair level of the pods' counts for 7/8 of the
	// budget: the biggest holders first) gets no new connection (a
	// reset, or 503 on an HBONE stream;
	// ambit_tunnel_connections_failed_total{reason="over_share"} and a
	// log line naming the pod), while a pod below the level gets in
	// until the agent holds the whole budget, a hard bound; so one pod
	// cannot take the agent, and every pod's mesh with it, down. 0: derived from what the agent has (three
	// quarters of GOMEMLIMIT at 32 KiB a connection, or RLIMIT_NOFILE
	// less a reserve at two descriptors a connection, the smaller: 24,576
	// with the DaemonSet's 1 GiB); -1: no budget (docs/tunnel.md
	// "Connection share").
	MaxConnections int `json:"maxConnections,omitempty"`
	// MaxConcurrentRequests bounds plugin requests handled at once.
	MaxConcurrentRequests int `json:"maxConcurrentRequests,omitempty"`
	// RequestTimeout bounds one plugin exchange; keep it below the plugin's
	// own timeout so the plugin gets an answer, not a timeout.
	RequestTimeout Duration `json:"requestTimeout,omitempty"`
	// DrainTimeout bounds how long established connections may finish
	// when a pod is unenrolled or the agent stops.
	DrainTimeout Duration `json:"drainTimeout,omitempty"`
	// AdoptConcurrency is how many pods are re-adopted in parallel at start.
	AdoptConcurrency int `json:"adoptConcurrency,omitempty"`
	// RuleCheckInterval is how often the agent verifies every enrolled
	// pod's redirection and repairs it when someone removed or changed it
	// (a flushed ruleset would let the pod's traffic bypass the mesh).
	// 0 disables the periodic check (the check at re-adoption stays).
	RuleCheckInterval Duration `json:"ruleCheckInterval,omitempty"`

	// CAAddress is the CA service (kubernetes source); CATokenFile the
	// projected token (audience ambit-ca) the agent authenticates with;
	// CARootsFile the CA's trust bundle (ConfigMap ambit-ca-root).
	CAAddress   string `json:"caAddress,omitempty"`
	CATokenFile string `json:"caTokenFile,omitempty"`
	CARootsFile string `json:"caRootsFile,omitempty"`
	// LocalCADir holds the in-process CA of the inventory source (created
	// on first start). Default <stateDir>/ca.
	LocalCADir string `json:"localCADir,omitempty"`
	// PolicyDir is a directory of policy YAML files (AuthorizationPolicy,
	// InboundMode), reloaded on change; "" = none. With the kubernetes
	// source, policies also come from the API (IstioPolicies adds Istio's
	// security.istio.io AuthorizationPolicies).
	PolicyDir     string `json:"policyDir,omitempty"`
	IstioPolicies bool   `json:"istioPolicies,omitempty"`
	// HostRules (kubelet probe SNAT on the host) and InstallCNI (write the
	// plugin and its conflist entry once the socket serves): auto (on
	// with the kubernetes source), on or off. CNIBinDir/CNIConfDir are the
	// host's CNI directories as mounted in the agent.
	HostRules  string `json:"hostRules,omitempty"`
	InstallCNI string `json:"installCNI,omitempty"`
	CNIBinDir  string `json:"cniBinDir,omitempty"`
	CNIConfDir string `json:"cniConfDir,omitempty"`
	// ReadyTaint is the key of the startup taint nodes may register with
	// (kubelet --register-with-taints=<key>=:NoSchedule): with the
	// kubernetes source the agent removes every taint with this key from
	// its own Node once it can enroll pods (its CNI entry is written and
	// its socket serves), and again if it is put back while the agent
	// runs, so no pod is scheduled to a node before the mesh can take it
	// (node-agent/readytaint). Nodes without the taint are only watched.
	// Empty disables it. Not omitempty: "" must survive being written
	// back, or it would read as the default.
	ReadyTaint string `json:"readyTaint"`

	// LogLevel is debug, info, warn or error; LogFormat text or json.
	LogLevel  string `json:"logLevel,omitempty"`
	LogFormat string `json:"logFormat,omitempty"`
}

// Default returns the configuration used when nothing is set.
func Default() Config {
	node := os.Getenv("NODE_NAME")
	if node == "" {
		node, _ = os.Hostname()
	}
	return Config{
		NodeName:              node,
		StateDir:              "/var/run/ambit",
		HealthAddr:            ":15021",
		ProcRoot:              "/proc",
		EnrollLabel:           DefaultEnrollLabel,
		ExcludedNamespaces:    []string{"kube-system"},
		TrustDomain:           "cluster.local",
		IPv6:                  "auto",
		RedirectBackend:       "auto",
		MaxConcurrentRequests: 64,
		RequestTimeout:        Duration{Duration: 8 * time.Second},
		DrainTimeout:          Duration{Duration: 30 * time.Second},
		AdoptConcurrency:      16,
		RuleCheckInterval:     Duration{Duration: time.Minute},
		KubeAPIQPS:            50,
		KubeAPIBurst:          100,
		LogLevel:              "info",
		LogFormat:             "text",
		CAAddress:             "https://ambit-ca.ambit-system.svc:15012",
		CATokenFile:           "/var/run/secrets/ambit/tokens/ambit-ca",
		CARootsFile:           "/var/run/secrets/ambit/ca/root-cert.pem",
		HostRules:             "auto",
		InstallCNI:            "auto",
		CNIBinDir:             "/host/opt/cni/bin",
		CNIConfDir:            "/host/etc/cni/net.d",
		ReadyTaint:            DefaultReadyTaint,
	}
}

// Load reads path (YAML or JSON) over the defaults and validates the
// result. An empty path returns the defaults. Unknown keys are errors: a
// misspelt field must not silently keep its default.
func Load(path string) (Config, error) {
	c := Default()
	if path == "" {
		return c, c.finish()
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return c, fmt.Errorf("reading config: %w", err)
	}
	if err := Parse(b, &c); err != nil {
		return c, fmt.Errorf("config %s: %w", path, err)
	}
	if err := c.finish(); err != nil {
		return c, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

// Parse decodes b over c without validating.
func Parse(b []byte, c *Config) error {
	if len(strings.TrimSpace(string(b))) == 0 {
		return nil
	}
	if err := yaml.UnmarshalStrict(b, c); err != nil {
		return err
	}
	// YAML 1.1 reads on, off, yes and no as booleans, which reach these
	// string keys as "true" and "false": `ipv6: off`, written as the docs
	// write it, would otherwise be refused as "false".
	for _, v := range []*string{&c.IPv6, &c.HostRules, &c.InstallCNI} {
		switch *v {
		case "true":
			*v = "on"
		case "false":
			*v = "off"
		}
	}
	return nil
}

// Finish fills derived defaults and validates; call after flags are applied.
func (c *Config) Finish() error { return c.finish() }

func (c *Config) finish() error {
	if c.Source == "" {
		if c.InventoryFile != "" {
			c.Source = SourceInventory
		} else {
			c.Source = SourceKubernetes
		}
	}
	if c.Socket == "" && c.StateDir != "" {
		c.Socket = filepath.Join(c.StateDir, "cni.sock")
	}
	if c.LocalCADir == "" && c.StateDir != "" {
		c.LocalCADir = filepath.Join(c.StateDir, "ca")
	}
	if c.SnapshotFile == "" && c.StateDir != "" {
		c.SnapshotFile = filepath.Join(c.StateDir, "enrollment-snapshot.json")
	}
	return c.Validate()
}

// Validate reports the first bad field, by its file key.
func (c *Config) Validate() error {
	if c.NodeName == "" {
		return errors.New("nodeName: empty (set it, or $NODE_NAME)")
	}
	switch c.Source {
	case SourceKubernetes:
	case SourceInventory:
		if c.InventoryFile == "" {
			return errors.New("inventoryFile: required when source is inventory")
		}
	default:
		return fmt.Errorf("source: %q is neither kubernetes nor inventory", c.Source)
	}
	for _, f := range []struct{ name, path string }{{"stateDir", c.StateDir}, {"socket", c.Socket}, {"procRoot", c.ProcRoot}, {"snapshotFile", c.SnapshotFile}} {
		if f.path == "" || !filepath.IsAbs(f.path) {
			return fmt.Errorf("%s: %q must be an absolute path", f.name, f.path)
		}
	}
	if c.MaxProcs < 0 {
		return fmt.Errorf("maxProcs: %d is negative (0 adapts the count to the load, up to half the CPUs, at least two)", c.MaxProcs)
	}
	if c.MaxConnections < -1 {
		return fmt.Errorf("maxConnections: %d must be 0 (derived from the memory limit and RLIMIT_NOFILE), -1 (no budget) or a budget of connections", c.MaxConnections)
	}
	if c.KeeperSocket != "" && (!filepath.IsAbs(c.KeeperSocket) || len(c.KeeperSocket) > 107) {
		return fmt.Errorf("keeperSocket: %q must be an absolute path of at most 107 bytes", c.KeeperSocket)
	}
	if len(c.Socket) > 107 {
		return fmt.Errorf("socket: %q is longer than a unix socket path may be (107 bytes)", c.Socket)
	}
	if c.HealthAddr != "" {
		_, port, err := net.SplitHostPort(c.HealthAddr)
		if err != nil {
			return fmt.Errorf("healthAddr: %q: %v", c.HealthAddr, err)
		}
		// Checked now: the agent binds it only once ready while another
		// agent runs on the node, and a port no bind can take then left
		// it running without /readyz, its pod never ready.
		if _, err := net.LookupPort("tcp", port); err != nil {
			return fmt.Errorf("healthAddr: %q: port %q is not a port number (0-65535) or service name", c.HealthAddr, port)
		}
	}
	if errs := validation.IsQualifiedName(c.EnrollLabel); len(errs) > 0 {
		return fmt.Errorf("enrollLabel: %q is not a valid label key: %s", c.EnrollLabel, strings.Join(errs, "; "))
	}
	if c.ReadyTaint != "" {
		// A taint key has a label key's syntax (the API server
		// validates both with the same rule).
		if errs := validation.IsQualifiedName(c.ReadyTaint); len(errs) > 0 {
			return fmt.Errorf("readyTaint: %q is not a valid taint key: %s (\"\" disables the startup taint)", c.ReadyTaint, strings.Join(errs, "; "))
		}
	}
	for i, ns := range c.ExcludedNamespaces {
		if errs := validation.IsDNS1123Label(ns); len(errs) > 0 {
			return fmt.Errorf("excludedNamespaces[%d]: %q is not a namespace name: %s", i, ns, strings.Join(errs, "; "))
		}
	}
	if c.TrustDomain == "" || strings.ContainsAny(c.TrustDomain, "/:@ ") {
		return fmt.Errorf("trustDomain: %q must be a non-empty DNS-like name", c.TrustDomain)
	}
	for _, f := range []struct{ name, v string }{{"hostRules", c.HostRules}, {"installCNI", c.InstallCNI}} {
		switch f.v {
		case "auto", "on", "off":
		default:
			return fmt.Errorf("%s: %q is not auto, on or off", f.name, f.v)
		}
	}
	if c.Source == SourceKubernetes && !strings.HasPrefix(c.CAAddress, "https://") {
		return fmt.Errorf("caAddress: %q must be an https:// URL", c.CAAddress)
	}
	// An empty path here would fail only when first used (the CA
	// request, the installer's first write), long after the agent
	// reported ready, and would turn back into the default when the
	// config is written out: it means nothing, so it is refused now.
	if c.Source == SourceKubernetes {
		for _, f := range []struct{ name, path string }{{"caTokenFile", c.CATokenFile}, {"caRootsFile", c.CARootsFile}} {
			if !filepath.IsAbs(f.path) {
				return fmt.Errorf("%s: %q must be an absolute path (the CA needs it with the kubernetes source)", f.name, f.path)
			}
		}
	}
	if c.Enabled(c.InstallCNI) {
		for _, f := range []struct{ name, path string }{{"cniBinDir", c.CNIBinDir}, {"cniConfDir", c.CNIConfDir}} {
			if !filepath.IsAbs(f.path) {
				return fmt.Errorf("%s: %q must be an absolute path while installCNI is on (set installCNI: off to not install)", f.name, f.path)
			}
		}
	}
	switch c.RedirectBackend {
	case "auto", "nftables", "iptables", "iptables-legacy", "iptables-nft":
	default:
		return fmt.Errorf("redirectBackend: %q is not auto, nftables, iptables, iptables-legacy or iptables-nft", c.RedirectBackend)
	}
	switch c.IPv6 {
	case "auto", "on", "off":
	default:
		return fmt.Errorf("ipv6: %q is not auto, on or off", c.IPv6)
	}
	if c.MaxConcurrentRequests < 1 || c.MaxConcurrentRequests > 4096 {
		return fmt.Errorf("maxConcurrentRequests: %d must be 1-4096", c.MaxConcurrentRequests)
	}
	for name, d := range map[string]Duration{"requestTimeout": c.RequestTimeout, "drainTimeout": c.DrainTimeout, "ruleCheckInterval": c.RuleCheckInterval} {
		if d.bad != "" {
			return fmt.Errorf("%s: %s is not a duration such as \"10s\" or \"1m30s\" (a number needs its unit)", name, d.bad)
		}
	}
	if c.RequestTimeout.Duration < 100*time.Millisecond || c.RequestTimeout.Duration > 5*time.Minute {
		return fmt.Errorf("requestTimeout: %s must be between 100ms and 5m", c.RequestTimeout)
	}
	if c.DrainTimeout.Duration < 0 || c.DrainTimeout.Duration > time.Hour {
		return fmt.Errorf("drainTimeout: %s must be between 0 and 1h", c.DrainTimeout)
	}
	if c.RuleCheckInterval.Duration < 0 || c.RuleCheckInterval.Duration > 24*time.Hour {
		return fmt.Errorf("ruleCheckInterval: %s must be between 0 (off) and 24h", c.RuleCheckInterval)
	}
	if !(c.KubeAPIQPS > 0 && c.KubeAPIQPS <= 10000) {
		return fmt.Errorf("kubeAPIQPS: %v must be above 0 and at most 10000", c.KubeAPIQPS)
	}
	if c.KubeAPIBurst < 1 || c.KubeAPIBurst > 100000 {
		return fmt.Errorf("kubeAPIBurst: %d must be 1-100000", c.KubeAPIBurst)
	}
	if c.AdoptConcurrency < 1 || c.AdoptConcurrency > 256 {
		return fmt.Errorf("adoptConcurrency: %d must be 1-256", c.AdoptConcurrency)
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		return fmt.Errorf("logLevel: %q is not debug, info, warn or error", c.LogLevel)
	}
	switch c.LogFormat {
	case "text", "json":
	default:
		return fmt.Errorf("logFormat: %q is not text or json", c.LogFormat)
	}
	return nil
}

// Enabled resolves an auto|on|off setting: auto means on with the
// kubernetes source.
func (c *Config) Enabled(v string) bool {
	return v == "on" || v == "auto" && c.Source == SourceKubernetes
}
