// Command ambit-agent is Ambit's node agent: it serves the ambit-cni
// plugin, opens the per-pod listeners of enrolled pods inside their network
// namespaces, runs the HBONE tunnel for them, follows label changes and
// re-adopts every enrolled pod after a restart.
//
//	ambit-agent [run] [flags]      the agent (default)
//	ambit-agent ca [flags]         the certificate authority
//	ambit-agent install|uninstall  the CNI installer
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/ambit-mesh/ambit/node-agent/agent"
	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/node-agent/config"
	"github.com/ambit-mesh/ambit/node-agent/health"
	"github.com/ambit-mesh/ambit/node-agent/inventory"
	"github.com/ambit-mesh/ambit/tunnel"
)

func main() {
	args := os.Args[1:]
	cmd := "run"
	if len(args) > 0 && len(args[0]) > 0 && args[0][0] != '-' {
		cmd, args = args[0], args[1:]
	}
	var err error
	switch cmd {
	case "run":
		err = run(args)
	case "ca", "install", "uninstall":
		err = fmt.Errorf("%q is not built into this ambit-agent yet", cmd)
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
Run "ambit-agent run -h" for the agent's flags; node-agent/README.md documents every config field.`)
}

// overrides are the flags that may override single config fields.
type overrides struct {
	path                                                                string
	nodeName, source, inventory, stateDir, socket, healthAddr, logLevel string
}

func run(args []string) error {
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
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, err := loadConfig(o)
	if err != nil {
		return err
	}
	log := newLogger(cfg)
	slog.SetDefault(log)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	hs := health.New(reg)

	view, status, err := openView(ctx, cfg, log)
	if err != nil {
		return err
	}
	tun, err := openTunnel(cfg, view, reg, log)
	if err != nil {
		return err
	}
	a, err := agent.New(agent.Options{Config: cfg, View: view, Status: status, Tunnel: tun, Registerer: reg, Health: hs, Logger: log})
	if err != nil {
		return err
	}
	if inv, ok := view.(*inventory.Source); ok {
		pol := a.Policy()
		inv.SetMeshed(func(p cluster.Pod, ns *cluster.Namespace) bool { return pol.Decide(p, ns).Enroll })
		go inv.Watch(ctx)
	}
	if cfg.HealthAddr != "" {
		go func() {
			if err := hs.Serve(ctx, cfg.HealthAddr); err != nil {
				log.Error("health server", "err", err)
			}
		}()
	}
	log.Info("ambit-agent starting", "node", cfg.NodeName, "source", cfg.Source, "socket", cfg.Socket, "stateDir", cfg.StateDir)
	return a.Run(ctx)
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
	if o.stateDir != "" && o.socket == "" {
		cfg.Socket = o.stateDir + "/cni.sock"
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

func openView(ctx context.Context, cfg config.Config, log *slog.Logger) (cluster.View, cluster.StatusWriter, error) {
	switch cfg.Source {
	case config.SourceInventory:
		inv, err := inventory.Load(inventory.Options{Path: cfg.InventoryFile, NodeName: cfg.NodeName, TrustDomain: cfg.TrustDomain, EnrollLabel: cfg.EnrollLabel, Logger: log})
		if err != nil {
			return nil, nil, err
		}
		return inv, inv, nil
	case config.SourceKubernetes:
		return nil, nil, errors.New("source kubernetes is not built into this ambit-agent yet; use source: inventory")
	}
	return nil, nil, fmt.Errorf("unknown source %q", cfg.Source)
}

func openTunnel(cfg config.Config, dir tunnel.Directory, reg prometheus.Registerer, log *slog.Logger) (agent.Tunnel, error) {
	return nil, errors.New("workload certificates (node-agent/identity) are not built into this ambit-agent yet, so the tunnel cannot run")
}
