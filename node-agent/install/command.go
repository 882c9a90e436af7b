package install

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"time"
)

// Hooks are what a command needs from the agent binary around it.
type Hooks struct {
	// UnenrollAll backs `uninstall --unenroll-all`; nil makes that flag
	// an error rather than a silent no-op.
	UnenrollAll func(ctx context.Context) error
	// Flags, when set, adds the agent's own flags for the command (e.g.
	// how uninstall reaches the API server); they are parsed with ours.
	Flags  func(cmd string, fs *flag.FlagSet)
	Logger *slog.Logger
}

// Command runs `ambit-agent install` or `ambit-agent uninstall` with
// their flags, so the agent's main only dispatches:
//
//	case "install", "uninstall":
//		err = install.Command(ctx, cmd, args, install.Hooks{UnenrollAll: ...})
//
// Standalone `install` (a sidecar or a node without the agent in the same
// process) waits until the agent's socket accepts connections before
// writing the conflist — the same guarantee Config.Ready gives in-process.
// `uninstall --hold` keeps the process alive afterwards, for a DaemonSet
// whose pods must stay Running (manifests/overlays/uninstall).
func Command(ctx context.Context, name string, args []string, h Hooks) error {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	var cfg Config
	cfg.RegisterFlags(fs)
	if h.Flags != nil {
		h.Flags(name, fs)
	}
	cfg.Logger = h.Logger
	switch name {
	case "install":
		wait := fs.Bool("wait-for-agent", true, "write the conflist only once the agent socket accepts connections")
		if err := fs.Parse(args); err != nil {
			return err
		}
		if *wait {
			ready := make(chan struct{})
			cfg.Ready = ready
			go func() {
				if waitSocket(ctx, cfg.Entry.AgentSocket) == nil {
					close(ready)
				}
			}()
		}
		return Run(ctx, cfg)
	case "uninstall":
		unenroll := fs.Bool("unenroll-all", false, "also remove redirection from every enrolled running pod on this node")
		hold := fs.Bool("hold", false, "after uninstalling, stay running until terminated")
		if err := fs.Parse(args); err != nil {
			return err
		}
		var unsupported error
		if *unenroll {
			if h.UnenrollAll == nil {
				// Still take the entry and binary off the node.
				unsupported = errors.New("--unenroll-all is not supported by this ambit-agent build: the CNI entry and binary were removed, redirection in running pods was not")
			}
			cfg.UnenrollAll = h.UnenrollAll
		}
		if err := Uninstall(ctx, cfg); err != nil {
			return err
		}
		if unsupported != nil {
			return unsupported
		}
		if *hold {
			<-ctx.Done()
		}
		return nil
	}
	return fmt.Errorf("unknown installer command %q", name)
}

// waitSocket polls until a SOCK_SEQPACKET connection to path succeeds.
func waitSocket(ctx context.Context, path string) error {
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for {
		var d net.Dialer
		c, err := d.DialContext(ctx, "unixpacket", path)
		if err == nil {
			c.Close()
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}
