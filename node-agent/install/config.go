package install

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// PluginType is the "type" of our conflist entry and the name of the
// plugin binary in the CNI bin directory.
const PluginType = "ambit-cni"

// Default paths as the DaemonSet mounts them: the host's /opt/cni/bin and
// /etc/cni/net.d under /host, the agent socket at the same path on both
// sides (the plugin runs on the host and dials it there).
const (
	DefaultCNIBinDir   = "/host/opt/cni/bin"
	DefaultCNIConfDir  = "/host/etc/cni/net.d"
	DefaultAgentSocket = "/var/run/ambit/cni.sock"
)

// BackupDir is the hidden directory inside the CNI config directory that
// keeps the original bytes of a single-plugin .conf/.json we converted to
// a .conflist, so uninstall can put it back exactly. Runtimes only load
// regular files from the config directory, never subdirectories.
const BackupDir = ".ambit"

// Entry is our plugin's conflist entry. Field names are ambit-cni's
// configuration keys (plugin/config.go); empty fields are left out so the
// plugin's own defaults apply. Paths are host paths: the runtime runs the
// plugin on the host.
type Entry struct {
	Name               string   `json:"name"`
	AgentSocket        string   `json:"agentSocket,omitempty"`
	AgentTimeout       string   `json:"agentTimeout,omitempty"`
	AgentDownPolicy    string   `json:"agentDownPolicy,omitempty"`
	SnapshotFile       string   `json:"snapshotFile,omitempty"`
	ExcludedNamespaces []string `json:"excludedNamespaces,omitempty"`
	LogLevel           string   `json:"logLevel,omitempty"`
	LogFile            string   `json:"logFile,omitempty"`
	RuleBackend        string   `json:"ruleBackend,omitempty"`
	// DefaultNamespace is for runtimes without namespaces (podman); see
	// plugin/README.md.
	DefaultNamespace string `json:"defaultNamespace,omitempty"`
}

// JSON encodes the entry with "type" first.
func (e Entry) JSON() ([]byte, error) {
	type alias Entry
	body, err := json.Marshal(alias(e))
	if err != nil {
		return nil, err
	}
	// {"type":"ambit-cni", + the rest of the object.
	return append([]byte(`{"type":"`+PluginType+`",`), body[1:]...), nil
}

// Config tells the installer where things are and when it may act.
type Config struct {
	// CNIBinDir is the host's CNI plugin directory as mounted here.
	CNIBinDir string
	// CNIConfDir is the host's CNI config directory as mounted here.
	CNIConfDir string
	// PluginSource is the ambit-cni binary to copy. Default: ambit-cni
	// next to the running executable (both are in the image's
	// /usr/local/bin).
	PluginSource string
	// Entry is written into the primary conflist.
	Entry Entry

	// Ready, when not nil, is closed by the caller once the agent serves
	// the plugin socket. The conflist entry is written only after Ready,
	// so no pod passes through the plugin before the agent can answer.
	Ready <-chan struct{}
	// Serving, when not nil, is closed by the caller once this agent
	// serves the plugin socket (it may before Ready: when the older
	// agent of a surge stops first). The binary is copied only then;
	// without Serving, right away. During a surge upgrade the older
	// agent keeps the socket until this one is ready: a plugin copied
	// at start would be newer than the agent answering it, and every
	// ADD, CHECK and DEL would be refused once in the newer protocol
	// and asked again (a warning in the older agent's log for each).
	Serving <-chan struct{}
	// OnState, when set, is called after every reconciliation with
	// whether our entry is in place in the primary config (and its
	// path). The agent uses it for /readyz: a node whose runtime would
	// not run ambit-cni is not ready.
	OnState func(installed bool, primary string)
	// OnInstalled, when set, is called after every reconciliation that
	// leaves our entry in place (the installed half of OnState).
	OnInstalled func(primary string)
	// UnenrollAll, when set, is called by Uninstall after the entry and
	// binary are gone, to remove redirection from every pod enrolled on
	// this node. The agent fills it (it knows the pods and their
	// network namespaces); nil leaves running pods as they are.
	UnenrollAll func(ctx context.Context) error
	// Yield, when set and returning true, makes the installer leave the
	// node's files alone: a newer agent runs on this node (surge upgrade)
	// and owns them. Without it, two versions of the agent would keep
	// replacing each other's plugin binary and entry until the old one
	// exits. Checked before every reconciliation.
	Yield func() bool

	// Resync is how often the installer re-checks without a file event
	// (events can be lost on overflow). Default 30s.
	Resync time.Duration
	// Debounce waits for a writer to finish a burst of changes before
	// acting. Default 100ms.
	Debounce time.Duration
	// Settle is how long a broken config file that sorts before the
	// primary must stay unchanged before we treat it as invalid and chain
	// into the next file: a CNI daemon that writes its file in place is
	// briefly "invalid" mid-write, and we must not act on another file
	// meanwhile. Default 2s.
	Settle time.Duration
	// FightThreshold re-assertions within FightWindow mean another
	// writer keeps removing our entry: warn and count. Defaults 5, 1m.
	FightThreshold int
	FightWindow    time.Duration

	// Registerer receives the installer's metrics; nil keeps them
	// private.
	Registerer prometheus.Registerer
	Logger     *slog.Logger
}

// RegisterFlags binds the paths and entry fields to command-line flags,
// for ambit-agent's install and uninstall subcommands.
func (c *Config) RegisterFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.CNIBinDir, "cni-bin-dir", DefaultCNIBinDir, "host CNI plugin directory, as mounted in this container")
	fs.StringVar(&c.CNIConfDir, "cni-conf-dir", DefaultCNIConfDir, "host CNI config directory, as mounted in this container")
	fs.StringVar(&c.PluginSource, "cni-plugin-source", "", "ambit-cni binary to install (default: next to this executable)")
	fs.StringVar(&c.Entry.AgentSocket, "cni-agent-socket", DefaultAgentSocket, "agent socket path written into the plugin config (host path)")
	fs.StringVar(&c.Entry.LogLevel, "cni-log-level", "", "plugin log level (debug, info, warn, error; empty = plugin default)")
	fs.StringVar(&c.Entry.LogFile, "cni-log-file", "", "plugin log file on the host (empty = plugin default)")
	fs.Func("cni-excluded-namespaces", "comma-separated namespaces the plugin never enrolls (empty = plugin default, kube-system)", func(s string) error {
		c.Entry.ExcludedNamespaces = nil
		for _, ns := range strings.Split(s, ",") {
			if ns = strings.TrimSpace(ns); ns != "" {
				c.Entry.ExcludedNamespaces = append(c.Entry.ExcludedNamespaces, ns)
			}
		}
		return nil
	})
}

func (c Config) withDefaults() (Config, error) {
	if c.CNIBinDir == "" {
		c.CNIBinDir = DefaultCNIBinDir
	}
	if c.CNIConfDir == "" {
		c.CNIConfDir = DefaultCNIConfDir
	}
	if c.PluginSource == "" {
		exe, err := os.Executable()
		if err != nil {
			return c, fmt.Errorf("locating ambit-cni next to this executable: %w", err)
		}
		c.PluginSource = filepath.Join(filepath.Dir(exe), PluginType)
	}
	if c.Entry.Name == "" {
		c.Entry.Name = PluginType
	}
	if c.Entry.AgentSocket == "" {
		c.Entry.AgentSocket = DefaultAgentSocket
	}
	if c.Resync <= 0 {
		c.Resync = 30 * time.Second
	}
	if c.Debounce <= 0 {
		c.Debounce = 100 * time.Millisecond
	}
	if c.Settle <= 0 {
		c.Settle = 2 * time.Second
	}
	if c.FightThreshold <= 0 {
		c.FightThreshold = 5
	}
	if c.FightWindow <= 0 {
		c.FightWindow = time.Minute
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	c.Logger = c.Logger.With("component", "installer")
	for name, p := range map[string]string{"cni-bin-dir": c.CNIBinDir, "cni-conf-dir": c.CNIConfDir, "cni-plugin-source": c.PluginSource, "cni-agent-socket": c.Entry.AgentSocket} {
		if !filepath.IsAbs(p) {
			return c, fmt.Errorf("%s %q must be an absolute path", name, p)
		}
	}
	if len(c.Entry.AgentSocket) > 107 {
		return c, errors.New("agent socket path is longer than the 107 bytes a unix socket address holds")
	}
	if c.Entry.LogFile != "" && !filepath.IsAbs(c.Entry.LogFile) {
		return c, fmt.Errorf("cni-log-file %q must be an absolute path", c.Entry.LogFile)
	}
	return c, nil
}

// pluginVersions are the cniVersions ambit-cni accepts (plugin/dispatch.go
// supportedVersions, which a test holds this to). It refuses any other,
// ADD and DEL alike.
var pluginVersions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}
