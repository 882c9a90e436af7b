// Command ambit-agent is Ambit's node agent: it serves the ambit-cni
// plugin, opens the per-pod listeners of enrolled pods inside their network
// namespaces, runs the HBONE tunnel for them, follows label changes and
// re-adopts every enrolled pod after a restart.
//
//	ambit-agent [run] [flags]      the agent (default)
//	ambit-agent ca [flags]         the certificate authority
//	ambit-agent install|uninstall  the CNI installer
//	ambit-agent status [pods|certs|conns]  what this node's agent serves
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/ambit-mesh/ambit/internal/maxprocs"
	"github.com/ambit-mesh/ambit/node-agent/admin"
	"github.com/ambit-mesh/ambit/node-agent/agent"
	"github.com/ambit-mesh/ambit/node-agent/ca"
	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/node-agent/config"
	"github.com/ambit-mesh/ambit/node-agent/enrollment"
	"github.com/ambit-mesh/ambit/node-agent/health"
	"github.com/ambit-mesh/ambit/node-agent/hostrules"
	"github.com/ambit-mesh/ambit/node-agent/identity"
	"github.com/ambit-mesh/ambit/node-agent/install"
	"github.com/ambit-mesh/ambit/node-agent/instance"
	"github.com/ambit-mesh/ambit/node-agent/inventory"
	"github.com/ambit-mesh/ambit/node-agent/keeper"
	"github.com/ambit-mesh/ambit/node-agent/kube"
	"github.com/ambit-mesh/ambit/node-agent/policy"
	"github.com/ambit-mesh/ambit/node-agent/policy/filesource"
	"github.com/ambit-mesh/ambit/node-agent/policy/kubesource"
	"github.com/ambit-mesh/ambit/node-agent/readytaint"
	"github.com/ambit-mesh/ambit/plugin/redirect"
	"github.com/ambit-mesh/ambit/tunnel"
)

func main() {
	args := os.Args[1:]
	cmd := "run"
	if len(args) > 0 && len(args[0]) > 0 && args[0][0] != '-' {
		cmd, args = args[0], args[1:]
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	var err error
	switch cmd {
	case "run":
		err = run(ctx, args)
	case "ca":
		err = runCA(ctx, args)
	case "install", "uninstall":
		err = runInstall(ctx, cmd, args)
	case "probe":
		err = runProbe(args)
	case "status":
		err = runStatus(ctx, args, os.Stdout)
	case "keeper":
		err = runKeeper(ctx, args)
	case "help":
		usage()
		return
	default:
		usage()
		err = fmt.Errorf("unknown command %q", cmd)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "ambit-agent:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, `usage: ambit-agent [run] [-config FILE] [flags]   run the node agent
       ambit-agent ca [flags]                     run the certificate authority
       ambit-agent install|uninstall [flags]      install or remove the CNI plugin
       ambit-agent probe [flags]                  exit 0 if this container's agent is ready (startup probe)
       ambit-agent status [pods|certs|conns] [-o table|json] [--all]
                                                  what this node's agent serves (its admin socket; docs/agent.md)
       ambit-agent keeper -socket PATH            hold the agent's listeners across its crashes (second container)
Run "ambit-agent run -h" for the agent's flags; node-agent/README.md documents every config field.`)
}

// overrides are the flags that may override single config fields.
type overrides struct {
	path                                                                string
	nodeName, source, inventory, stateDir, socket, healthAddr, logLevel string
	instanceFile                                                        string
	// 0: not given.
	kubeAPIQPS   float64
	kubeAPIBurst int
}

func run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	var o overrides
	fs.StringVar(&o.path, "config", os.Getenv("AMBIT_CONFIG"), "configuration file (YAML or JSON); $AMBIT_CONFIG")
	fs.StringVar(&o.nodeName, "node-name", "", "overrides nodeName")
	fs.StringVar(&o.source, "source", "", "overrides source (kubernetes|inventory)")
	fs.StringVar(&o.inventory, "inventory", "", "overrides inventoryFile")
	fs.StringVar(&o.stateDir, "state-dir", "", "overrides stateDir")
	fs.StringVar(&o.socket, "socket", "", "overrides socket")
	fs.StringVar(&o.healthAddr, "health-addr", "", "overrides healthAddr")
	fs.StringVar(&o.logLevel, "log-level", "", "overrides logLevel")
	fs.Float64Var(&o.kubeAPIQPS, "kube-api-qps", 0, "overrides kubeAPIQPS (client-side rate limit of the Kubernetes clients; default 50)")
	fs.IntVar(&o.kubeAPIBurst, "kube-api-burst", 0, "overrides kubeAPIBurst (default 100)")
	fs.StringVar(&o.instanceFile, "instance-file", "", "file private to this container naming this agent's registry entry, for `ambit-agent probe`")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, err := loadConfig(o)
	if err != nil {
		return err
	}
	log := newLogger(cfg)
	slog.SetDefault(log)
	// Adapts for the process's life, past ctx's end: a drain's work
	// follows the signal.
	procs, procsFrom, adaptive := maxprocs.Start(context.Background(), cfg.MaxProcs, func(from, to int, busy float64) {
		log.Debug("GOMAXPROCS changed", "was", from, "now", to, "busyCPUs", fmt.Sprintf("%.2f", busy))
	})
	if adaptive {
		log.Info("GOMAXPROCS", "max", procs, "from", procsFrom, "adaptive", "1 to max with the agent's load")
	} else {
		log.Info("GOMAXPROCS", "value", procs, "from", procsFrom)
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	hs := health.New(reg)
	hs.SetLogger(log)
	reg.MustRegister(hs.Collector())

	pol := enrollment.NewPolicy(cfg.EnrollLabel, cfg.ExcludedNamespaces)
	meshed := func(p cluster.Pod, ns *cluster.Namespace) bool { return pol.Decide(p, ns).Enroll }

	// The cluster view and, with Kubernetes, the API clients.
	var (
		view    cluster.View
		status  cluster.StatusWriter
		restCfg *rest.Config
		kclient kubernetes.Interface
		idCfg   = identity.Config{TrustDomain: cfg.TrustDomain, Logger: log, Registerer: reg}
	)
	switch cfg.Source {
	case config.SourceInventory:
		inv, err := inventory.Load(inventory.Options{Path: cfg.InventoryFile, NodeName: cfg.NodeName, TrustDomain: cfg.TrustDomain,
			EnrollLabel: cfg.EnrollLabel, Meshed: meshed, Logger: log})
		if err != nil {
			return err
		}
		view, status = inv, inv
		// Static mode: an in-process CA whose files live in the state dir.
		idCfg.TrustDomain = inv.TrustDomain()
		idCfg.LocalCADir = cfg.LocalCADir
	case config.SourceKubernetes:
		var err error
		if restCfg, err = kubeRESTConfig(cfg); err != nil {
			return err
		}
		client, err := kubernetes.NewForConfig(restCfg)
		if err != nil {
			return fmt.Errorf("kubernetes client: %w", err)
		}
		ks, err := kube.New(kube.Config{Client: client, NodeName: cfg.NodeName, TrustDomain: cfg.TrustDomain,
			Decide: func(p cluster.Pod, ns cluster.Namespace) bool { return pol.Decide(p, &ns).Enroll }, Logger: log})
		if err != nil {
			return err
		}
		ks.Start(ctx)
		defer ks.Close()
		view, status, kclient = ks, ks, client
		idCfg.Remote = &identity.RemoteConfig{URL: cfg.CAAddress, TokenFile: cfg.CATokenFile, RootsFile: cfg.CARootsFile}
	}

	// Certificate rotation turns at least every rootsRefresh (5 m) and
	// fetches in goroutines bounded by their own time-out, so its loop
	// only misses its turn when it cannot take its lock.
	certTurns := health.NewHeartbeat("certificates", 2*time.Minute)
	hs.AddHeartbeat(certTurns)
	idCfg.OnTurn = func(next time.Time) { certTurns.Beat(time.Until(next)) }
	ids, err := identity.NewManager(idCfg)
	if err != nil {
		return err
	}
	go runRotation(ctx, ids.Run, certTurns, log)

	// Policies, and the tunnel that enforces them.
	engine := policy.New(policy.Options{Logger: log, Registerer: reg})
	proxy, err := tunnel.New(tunnel.Config{Directory: view, Certificates: ids, Authorizer: engine, Logger: log, Registerer: reg,
		MaxConnections: cfg.MaxConnections})
	if err != nil {
		return err
	}
	engine.OnChange(proxy.Reauthorize)
	if cfg.PolicyDir != "" {
		fsrc := filesource.New(cfg.PolicyDir, engine, log)
		fsrc.Load()
		go func() {
			if err := fsrc.Run(ctx); err != nil && ctx.Err() == nil {
				log.Error("policy files no longer followed: edits are not applied until a restart", "dir", cfg.PolicyDir, "err", err)
			}
		}()
	}
	if restCfg != nil {
		dyn, err := dynamic.NewForConfig(restCfg)
		if err != nil {
			return fmt.Errorf("kubernetes dynamic client: %w", err)
		}
		disc, err := discovery.NewDiscoveryClientForConfig(restCfg)
		if err != nil {
			return fmt.Errorf("kubernetes discovery client: %w", err)
		}
		psrc, err := kubesource.New(kubesource.Options{Client: dyn, Discovery: disc, Engine: engine, Logger: log, Istio: cfg.IstioPolicies, WriteStatus: true})
		if err != nil {
			return err
		}
		psrcErr := make(chan error, 1)
		go func() {
			err := psrc.Run(ctx)
			if err != nil && ctx.Err() == nil {
				log.Error("policy watch stopped", "err", err)
			}
			psrcErr <- err
		}()
		// No pod is served before the cluster's policies are in force:
		// a new agent (restart, surge upgrade) opening listeners with an
		// empty policy set would let through what policy denies.
		synced := make(chan error, 1)
		go func() { synced <- psrc.WaitSynced(ctx) }()
		log.Info("waiting for the cluster's authorization policies")
		select {
		case err := <-synced:
			if err != nil {
				return err
			}
		case err := <-psrcErr:
			if err == nil {
				return ctx.Err()
			}
			return fmt.Errorf("policy watch: %w", err)
		}
	}

	// Other agents on this node (a surge upgrade runs two at once): the
	// health port, the node's CNI files and the host probe rules are
	// shared with them.
	self, err := instance.Register(cfg.StateDir)
	if err != nil {
		return err
	}
	defer self.Close()
	// In the state directory (a host volume): the stacks outlive the
	// restart the failing check brings (docs/troubleshooting.md). One
	// file per agent: two agents overlap during a surge.
	hs.SetStallDump(cfg.StateDir, self.Name())
	// From SIGTERM on this agent maintains nothing for the node, though
	// it lives on while it drains: an older agent still running (this
	// one's pod deleted during a surge, a rollback) must not keep
	// yielding the host rules, readiness and CNI files to it until then.
	unmark := context.AfterFunc(ctx, func() {
		if err := self.Stopping(); err != nil {
			log.Warn("instance registry", "err", err)
		}
	})
	defer unmark()
	self.Prune()
	pruneAdminSockets(cfg.StateDir)
	if o.instanceFile != "" {
		if err := self.WriteName(o.instanceFile); err != nil {
			return err
		}
	}

	var host agent.HostRules
	if cfg.Enabled(cfg.HostRules) {
		hr, err := hostrules.New(hostrules.Config{Registerer: reg, Logger: log, IPv4Only: cfg.IPv6 == "off",
			// The old agent keeps the rules until the new one has
			// re-adopted every pod and written the whole picture.
			Shared: true,
			Yield:  yieldHostRules(self)})
		if err != nil {
			return err
		}
		go hr.Run(ctx)
		host = hr
	}
	// No node-wide readiness: while a newer agent starts, this one keeps
	// answering /readyz for itself. The new pod cannot borrow that answer
	// (its exec startup probe answers for its own process, and the kubelet
	// probes readiness only after it passed), and an old pod that turned
	// unready is one the DaemonSet controller deletes at once during a
	// surge, before the new agent serves anything.

	var keep agent.Keeper
	if cfg.KeeperSocket != "" {
		if k := dialKeeper(ctx, cfg.KeeperSocket, log); k != nil {
			keep = k
		}
	}
	a, err := agent.New(agent.Options{Config: cfg, View: view, Status: status, Tunnel: agent.ProxyTunnel{Proxy: proxy},
		Certs: ids, Host: host, Keeper: keep, Registerer: reg, Health: hs, Peers: self.Others,
		// The plugin socket's path goes back to this agent when the
		// newer one that took it stops or dies (a rollback mid-surge).
		Newest: func() bool { _, newer := self.Successor(); return !newer },
		// Beside an older agent that serves (a surge upgrade) the socket
		// stays with it until this one is ready.
		Predecessor: self.ServingPredecessor,
		// At a stop, the keeper lets the pods' listeners go only to an
		// agent serving beside this one; otherwise (a liveness restart)
		// they stay kept for this container's next process.
		Beside: agent.ServingBeside(self),
		Logger: log})
	if err != nil {
		return err
	}
	// `ambit-agent status` asks this agent here, until it has drained.
	adm, err := admin.Listen(admin.SocketPath(cfg.StateDir, self.Name()), admin.Sources{
		Agent: agentInfo(ctx, self, cfg, a, time.Now()),
		Pods:  a.AdminPods, Certificates: ids.Certificates, Roots: ids.RootCertificates, Connections: proxy.Connections,
	}, log)
	if err != nil {
		// A debugging aid: the node is served without it.
		log.Warn("admin socket: `ambit-agent status` cannot ask this agent", "err", err)
	} else {
		defer adm.Close()
	}
	if inv, ok := view.(*inventory.Source); ok {
		inv.SetReloadHook(a.InventoryReloaded)
		go func() {
			if err := inv.Watch(ctx); err != nil && ctx.Err() == nil {
				log.Error("inventory file no longer followed: edits are not applied until a restart", "err", err)
			}
		}()
	}
	// The node can take pods once the agent enrolls them at ADD: its
	// socket serves and, when it installs the CNI entry, the entry is in
	// place (the installer writes it only after the socket serves).
	// Without the installer (installCNI off) the operator's entry is
	// taken as there.
	canEnroll := a.Ready()
	if cfg.Enabled(cfg.InstallCNI) {
		installed := make(chan struct{})
		var once sync.Once
		canEnroll = installed
		// The conflist entry appears only once the socket answers, so no
		// pod passes ambit-cni before the agent can serve it.
		icfg := install.Config{CNIBinDir: cfg.CNIBinDir, CNIConfDir: cfg.CNIConfDir, Ready: a.Ready(), Serving: a.Serving(), Logger: log,
			Yield:       func() bool { _, newer := self.Successor(); return newer },
			OnInstalled: func(string) { once.Do(func() { close(installed) }) },
			Entry:       install.Entry{AgentSocket: cfg.Socket, SnapshotFile: cfg.SnapshotFile, ExcludedNamespaces: cfg.ExcludedNamespaces}}
		go func() {
			if err := install.Run(ctx, icfg); err != nil && ctx.Err() == nil {
				log.Error("CNI installer stopped", "err", err)
			}
		}()
	}
	if kclient != nil && cfg.ReadyTaint != "" {
		go func() {
			if err := readytaint.Run(ctx, readytaint.Config{Client: kclient, NodeName: cfg.NodeName, Key: cfg.ReadyTaint,
				Ready: canEnroll, Registerer: reg, Logger: log}); err != nil {
				log.Error("startup taint", "err", err)
			}
		}()
	}
	if cfg.HealthAddr != "" {
		go func() {
			// While an older agent serves this node, join the shared
			// port only once ready: the kubelet's readiness probe of
			// the old pod lands on either process, and this one's 503
			// "starting" made the old pod unready, which the DaemonSet
			// controller deletes at once during a surge. Nothing probes
			// this pod over HTTP before its exec startup probe passed.
			if self.Others() {
				select {
				case <-a.Ready():
				case <-ctx.Done():
					return
				}
			}
			// Retry while the port is taken: an agent of a version
			// before the shared port (no SO_REUSEPORT) holds it until
			// the upgrade stops it. Giving up would leave this agent
			// without probes once the old one is gone.
			for warned := false; ; {
				err := hs.Serve(ctx, cfg.HealthAddr)
				if err == nil || ctx.Err() != nil {
					return
				}
				if !errors.Is(err, syscall.EADDRINUSE) {
					log.Error("health server", "err", err)
					return
				}
				if !warned {
					log.Warn("health port taken (an older agent without SO_REUSEPORT?); retrying every second", "addr", cfg.HealthAddr)
					warned = true
				}
				select {
				case <-ctx.Done():
					return
				case <-time.After(time.Second):
				}
			}
		}()
	}
	go func() {
		select {
		case <-a.Ready():
			if err := self.SetReady(); err != nil {
				log.Warn("instance registry", "err", err)
			}
		case <-ctx.Done():
		}
	}()
	log.Info("ambit-agent starting", "instance", self.Name(), "node", cfg.NodeName, "source", cfg.Source, "socket", cfg.Socket, "stateDir", cfg.StateDir)
	return a.Run(ctx)
}

// kubeRESTConfig is the configuration of every Kubernetes client of
// `ambit-agent run`: the kubeconfig (or in-cluster) with the configured
// rate limit. client-go's default (5/s, burst 10) would make the 50th
// pod of 50 started at once wait 8 s for its status annotation
// (config.Config.KubeAPIQPS says why 50/100).
func kubeRESTConfig(cfg config.Config) (*rest.Config, error) {
	c, err := kubeConfig(cfg.Kubeconfig)
	if err != nil {
		return nil, err
	}
	c.QPS, c.Burst = float32(cfg.KubeAPIQPS), cfg.KubeAPIBurst
	return c, nil
}

func kubeConfig(path string) (*rest.Config, error) {
	if path == "" {
		c, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("kubernetes: not in a cluster and no kubeconfig set: %w", err)
		}
		return c, nil
	}
	c, err := clientcmd.BuildConfigFromFlags("", path)
	if err != nil {
		return nil, fmt.Errorf("kubeconfig %s: %w", path, err)
	}
	return c, nil
}

// runCA is `ambit-agent ca`: the certificate authority service.
func runCA(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("ca", flag.ContinueOnError)
	var c ca.Config
	fs.StringVar(&c.Listen, "listen", ":15012", "HTTPS address")
	fs.StringVar(&c.MetricsListen, "metrics-listen", ":15014", "/metrics, /healthz, /readyz address (\"-\" disables)")
	fs.StringVar(&c.TrustDomain, "trust-domain", "cluster.local", "trust domain")
	fs.StringVar(&c.Namespace, "namespace", "ambit-system", "namespace of the signing Secret")
	fs.StringVar(&c.SecretName, "secret", "ambit-ca", "Secret holding the signing key")
	fs.StringVar(&c.RootsConfigMap, "roots-configmap", "ambit-ca-root", "ConfigMap the trust bundle is published to (\"-\" disables)")
	fs.StringVar(&c.AgentServiceAccount, "agent-service-account", "", "namespace/name of the agents' service account (default <namespace>/ambit-agent)")
	fs.StringVar(&c.Audience, "audience", "", "audience of the agents' tokens (default ambit-ca)")
	fs.DurationVar(&c.DefaultTTL, "ttl", 0, "workload certificate lifetime (default 24h)")
	fs.DurationVar(&c.MaxTTL, "max-ttl", 0, "longest lifetime an agent may ask for (default = ttl)")
	fs.Float64Var(&c.RateLimit, "rate-limit", 0, "requests per second per node (default 50)")
	fs.IntVar(&c.RateBurst, "rate-burst", 0, "burst per node (default 500)")
	fs.StringVar(&c.Kubeconfig, "kubeconfig", "", "kubeconfig (default in-cluster)")
	level := fs.String("log-level", "info", "debug, info, warn or error")
	format := fs.String("log-format", "json", "text or json")
	if err := fs.Parse(args); err != nil {
		return err
	}
	c.Logger = newLogger(config.Config{LogLevel: *level, LogFormat: *format})
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	c.Registerer = reg
	return ca.Run(ctx, c)
}

// runProbe is `ambit-agent probe`, the DaemonSet's startup probe. The
// readiness probe goes to the health port, which a surge upgrade shares
// between the old and the new agent of a node; this exec probe runs inside
// the new pod's container and answers for its own process only, so the new
// pod cannot be taken for ready on the old agent's word.
func runProbe(args []string) error {
	fs := flag.NewFlagSet("probe", flag.ContinueOnError)
	path := fs.String("config", os.Getenv("AMBIT_CONFIG"), "the agent's configuration file (for stateDir)")
	stateDir := fs.String("state-dir", "", "overrides stateDir")
	file := fs.String("instance-file", "", "the agent's --instance-file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *file == "" {
		return fmt.Errorf("probe: --instance-file is required")
	}
	cfg, err := loadConfig(overrides{path: *path, stateDir: *stateDir})
	if err != nil {
		return err
	}
	return instance.Probe(cfg.StateDir, *file)
}

// agentInfo is the agent part of `ambit-agent status`.
func agentInfo(ctx context.Context, self *instance.Self, cfg config.Config, a *agent.Agent, started time.Time) func() admin.Agent {
	return func() admin.Agent {
		ready := false
		select {
		case <-a.Ready():
			ready = true
		default:
		}
		return admin.Agent{Instance: self.Name(), PID: os.Getpid(), Node: cfg.NodeName, Source: cfg.Source,
			Started: started, Now: time.Now(), Ready: ready, Stopping: ctx.Err() != nil}
	}
}

// pruneAdminSockets removes the admin sockets agents killed on this node
// left behind.
func pruneAdminSockets(stateDir string) {
	live, err := instance.List(stateDir)
	if err != nil {
		return
	}
	names := map[string]bool{}
	for _, e := range live {
		names[e.Name] = true
	}
	admin.Prune(stateDir, func(n string) bool { return names[n] })
}

// defaultConfigFile is where the DaemonSet mounts the agent's
// configuration: `kubectl exec ... -- ambit-agent status` finds the state
// directory there without flags.
const defaultConfigFile = "/etc/ambit/config.yaml"

// runStatus is `ambit-agent status`: asks the node's agent (or agents,
// during a surge upgrade) through its admin socket what it serves.
func runStatus(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	path := fs.String("config", os.Getenv("AMBIT_CONFIG"), "the agent's configuration file, for stateDir (default $AMBIT_CONFIG, else "+defaultConfigFile+" if it exists)")
	stateDir := fs.String("state-dir", "", "overrides stateDir")
	file := fs.String("instance-file", "", "ask the agent named in this file (its --instance-file) rather than the newest")
	all := fs.Bool("all", false, "ask every live agent of the node (a surge upgrade runs two)")
	format := fs.String("o", "table", "output: table or json (json: the Status document, a list of them with --all)")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: ambit-agent status [pods|certs|conns] [-o table|json] [--all | --instance-file F] [--config F | --state-dir D]")
		fs.PrintDefaults()
	}
	// The view may come before or after the flags.
	if err := fs.Parse(args); err != nil {
		return err
	}
	view := admin.ViewPods
	if rest := fs.Args(); len(rest) > 0 {
		view = rest[0]
		if err := fs.Parse(rest[1:]); err != nil {
			return err
		}
		if len(fs.Args()) > 0 {
			return fmt.Errorf("status: unexpected %q", strings.Join(fs.Args(), " "))
		}
	}
	switch view {
	case admin.ViewPods, admin.ViewCerts, admin.ViewConns:
	default:
		return fmt.Errorf("status: unknown view %q (pods, certs or conns)", view)
	}
	if *format != "table" && *format != "json" {
		return fmt.Errorf("status: -o %q: table or json", *format)
	}
	if *all && *file != "" {
		return errors.New("status: --all and --instance-file exclude each other")
	}
	cfg := config.Default()
	if *path == "" {
		if _, err := os.Stat(defaultConfigFile); err == nil {
			*path = defaultConfigFile
		}
	}
	if *path != "" {
		b, err := os.ReadFile(*path)
		if err != nil {
			return fmt.Errorf("reading config: %w", err)
		}
		if err := config.Parse(b, &cfg); err != nil {
			return fmt.Errorf("config %s: %w", *path, err)
		}
	}
	if *stateDir != "" {
		cfg.StateDir = *stateDir
	}
	targets, err := admin.Targets(cfg.StateDir, *file, *all)
	if err != nil {
		return err
	}
	// Not nil: --all -o json prints [] when no agent answers, not null.
	docs := make([]*admin.Status, 0, len(targets))
	var failed []string
	for i, t := range targets {
		fctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		st, err := admin.Fetch(fctx, t.Socket)
		cancel()
		if err != nil {
			failed = append(failed, t.Instance)
			fmt.Fprintf(os.Stderr, "ambit-agent status: agent %s: %v\n", t.Instance, err)
			continue
		}
		docs = append(docs, st)
		if *format == "table" {
			if i > 0 {
				fmt.Fprintln(stdout)
			}
			if err := admin.Render(stdout, st, view); err != nil {
				return err
			}
		}
	}
	if *format == "json" && (*all || len(docs) > 0) {
		var v any = docs
		if !*all {
			v = docs[0]
		}
		if err := admin.WriteJSON(stdout, v); err != nil {
			return err
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("status: %d of %d agents did not answer (%s)", len(failed), len(targets), strings.Join(failed, ", "))
	}
	return nil
}

// runInstall is `ambit-agent install|uninstall` on their own.
func runInstall(ctx context.Context, cmd string, args []string) error {
	log := newLogger(config.Config{LogLevel: "info", LogFormat: "json"})
	stateDir, procRoot := "/var/run/ambit", "/host/proc"
	var kubeconfig, node string
	return install.Command(ctx, cmd, args, install.Hooks{
		Logger: log,
		Flags: func(cmd string, fs *flag.FlagSet) {
			if cmd != "uninstall" {
				return
			}
			fs.StringVar(&kubeconfig, "kubeconfig", "", "with --unenroll-all: kubeconfig for clearing the pods' ambit.dev/redirection annotation (default in-cluster)")
			fs.StringVar(&node, "node-name", os.Getenv("NODE_NAME"), "with --unenroll-all: this node, whose pods' annotation is cleared; $NODE_NAME")
		},
		UnenrollAll: func(ctx context.Context) error {
			if err := agent.UnenrollAll(ctx, stateDir, procRoot, agent.Rules{Backend: redirect.Auto}, statusClearer(kubeconfig, node, log), log); err != nil {
				return err
			}
			return removeHostRules(log)
		},
	})
}

// removeHostRules takes the node's probe SNAT (the ambit-host table,
// hostrules) away once no pod of the node is enrolled any more: left, it
// kept rewriting the source of the kubelet's probes to every pod whose IP
// it still listed, long after Ambit was gone. Only after a complete
// unenroll: a pod that still has its redirection needs it for its probes,
// and the uninstaller's restart tries both again.
func removeHostRules(log *slog.Logger) error {
	hr, err := hostrules.New(hostrules.Config{Logger: log})
	if err != nil {
		return fmt.Errorf("host probe rules: %w", err)
	}
	if err := hr.Uninstall(); err != nil {
		return err
	}
	log.Info("host probe rules removed")
	return nil
}

// statusClearer is how `uninstall --unenroll-all` takes the
// ambit.dev/redirection annotation off the node's pods, with the agent's
// client and RBAC: nil off a cluster (no kubeconfig, not in a pod: a
// static inventory has no annotations). A client that cannot be built
// still lets the local part run, then reports why.
func statusClearer(kubeconfig, node string, log *slog.Logger) func(context.Context) ([]string, error) {
	if kubeconfig == "" && os.Getenv("KUBERNETES_SERVICE_HOST") == "" {
		log.Info("not in a Kubernetes cluster and no --kubeconfig: no pod status annotations to clear")
		return nil
	}
	fail := func(err error) func(context.Context) ([]string, error) {
		return func(context.Context) ([]string, error) { return nil, err }
	}
	if node == "" {
		return fail(errors.New("clearing the pods' status needs this node's name: set --node-name or $NODE_NAME"))
	}
	rc, err := kubeConfig(kubeconfig)
	if err != nil {
		return fail(err)
	}
	// An API server that does not answer must not hold the uninstaller
	// forever: it reports and exits, and its restart tries again.
	rc.Timeout = 30 * time.Second
	// The agent's rate: a full node's pods are cleared in about a
	// second, not 20 (client-go's default 5/s).
	d := config.Default()
	rc.QPS, rc.Burst = float32(d.KubeAPIQPS), d.KubeAPIBurst
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return fail(fmt.Errorf("kubernetes client: %w", err))
	}
	return func(ctx context.Context) ([]string, error) { return kube.ClearRedirections(ctx, client, node) }
}

func loadConfig(o overrides) (config.Config, error) {
	cfg := config.Default()
	if o.path != "" {
		b, err := os.ReadFile(o.path)
		if err != nil {
			return cfg, fmt.Errorf("reading config: %w", err)
		}
		if err := config.Parse(b, &cfg); err != nil {
			return cfg, fmt.Errorf("config %s: %w", o.path, err)
		}
	}
	set := func(dst *string, v string) {
		if v != "" {
			*dst = v
		}
	}
	set(&cfg.NodeName, o.nodeName)
	set(&cfg.Source, o.source)
	set(&cfg.InventoryFile, o.inventory)
	set(&cfg.StateDir, o.stateDir)
	set(&cfg.Socket, o.socket)
	set(&cfg.HealthAddr, o.healthAddr)
	set(&cfg.LogLevel, o.logLevel)
	if o.kubeAPIQPS != 0 {
		cfg.KubeAPIQPS = o.kubeAPIQPS
	}
	if o.kubeAPIBurst != 0 {
		cfg.KubeAPIBurst = o.kubeAPIBurst
	}
	if err := cfg.Finish(); err != nil {
		if o.path != "" {
			return cfg, fmt.Errorf("config %s: %w", o.path, err)
		}
		return cfg, fmt.Errorf("config: %w", err)
	}
	return cfg, nil
}

func newLogger(cfg config.Config) *slog.Logger {
	var lvl slog.Level
	lvl.UnmarshalText([]byte(cfg.LogLevel))
	opts := &slog.HandlerOptions{Level: lvl}
	if cfg.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(os.Stderr, opts))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, opts))
}

// runKeeper is `ambit-agent keeper`: node-agent/keeper's server, in its
// own container so it outlives a crash of the agent's.
func runKeeper(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("keeper", flag.ContinueOnError)
	path := fs.String("socket", "/run/ambit-keeper/keeper.sock", "unix socket, in a volume shared with the agent's container (keeperSocket)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	// Its own process name, so tools (and e2e's kill -9 of the agent)
	// tell it from the agent.
	_ = os.WriteFile("/proc/self/comm", []byte("ambit-keeper"), 0)
	log := slog.New(slog.NewJSONHandler(os.Stderr, nil))
	log.Info("keeper listening", "socket", *path)
	return (&keeper.Server{Log: log}).Serve(ctx, *path)
}

// dialKeeper starts this agent's generation at the keeper, waiting a few
// seconds for it (the two containers start together); without one the
// agent runs as before.
func dialKeeper(ctx context.Context, path string, log *slog.Logger) *keeper.Client {
	deadline := time.Now().Add(5 * time.Second)
	for {
		k, err := keeper.Dial(path)
		if err == nil {
			log.Info("keeper: pods' listeners survive a crash of this agent", "socket", path)
			return k
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			log.Warn("keeper: not reachable; a crash of this agent closes every pod's listeners until it is back", "socket", path, "err", err)
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// yieldHostRules tells the host-rule Manager whether a newer agent on the
// node maintains the rules: any newer agent that is ready, not only the
// newest. With three agents on a node (a rollout started during a surge)
// the newest may still be starting; asking it alone made the oldest
// resume reconciling its stale picture beside the ready middle agent,
// the two rewriting each other's sets.
func yieldHostRules(self *instance.Self) func() bool {
	return func() bool { _, ok := self.ReadySuccessor(); return ok }
}

// runRotation runs certificate rotation (run) until ctx ends, with the
// stop signal, while the agent may still drain for up to drainTimeout
// (1 h at most). Its heartbeat then rests: a turn due after the signal
// never comes, and /healthz failed a draining agent within 7 minutes,
// so the kubelet's liveness probe killed it in the middle of a long
// drain.
func runRotation(ctx context.Context, run func(context.Context) error, hb *health.Heartbeat, log *slog.Logger) {
	err := run(ctx)
	if ctx.Err() != nil {
		hb.Rest()
		return
	}
	if err != nil {
		log.Error("certificate rotation stopped", "err", err)
	}
}
