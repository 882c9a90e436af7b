package lab

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// AgentOptions configure one ambit-agent process of a simulated node.
type AgentOptions struct {
	Binary    string // path of ambit-agent
	Inventory string // static inventory file
	// StateDir is the agent's state (default <node dir>/state); Socket
	// the plugin socket (default <StateDir>/cni.sock).
	StateDir string
	Socket   string
	// CADir shares one local CA between the nodes of a lab (default: the
	// agent's own, under StateDir).
	CADir string
	// PolicyDir holds authorization policies next to the inventory.
	PolicyDir string
	// Extra YAML appended to the config file.
	Extra string
	// LogFile receives the agent's output (default <node dir>/agent-N.log).
	LogFile string
}

// Agent is a running ambit-agent inside a node's network namespace.
type Agent struct {
	Opts    AgentOptions
	Config  string
	Cmd     *exec.Cmd
	log     *os.File
	exited  chan struct{}
	waitErr error
}

// AgentConfig renders the agent's configuration file for a node.
func (n *Node) AgentConfig(o *AgentOptions) string {
	if o.StateDir == "" {
		o.StateDir = filepath.Join(n.Opts.Dir, "state")
	}
	if o.Socket == "" {
		o.Socket = filepath.Join(o.StateDir, "cni.sock")
	}
	var b strings.Builder
	fmt.Fprintf(&b, "nodeName: %s\nsource: inventory\ninventoryFile: %s\nstateDir: %s\nsocket: %s\nhealthAddr: \"127.0.0.1:0\"\nlogFormat: json\nlogLevel: debug\nprocRoot: /proc\n",
		n.Opts.Name, o.Inventory, o.StateDir, o.Socket)
	if o.CADir != "" {
		fmt.Fprintf(&b, "localCADir: %s\n", o.CADir)
	}
	if o.PolicyDir != "" {
		fmt.Fprintf(&b, "policyDir: %s\n", o.PolicyDir)
	}
	b.WriteString(o.Extra)
	return b.String()
}

// StartAgent starts ambit-agent inside the node (the node's host network,
// as the DaemonSet runs; a Node with an empty Path is the machine itself)
// and waits until it serves the plugin socket.
func (n *Node) StartAgent(ctx context.Context, o AgentOptions) (*Agent, error) {
	cfg := n.AgentConfig(&o)
	if err := os.MkdirAll(o.StateDir, 0o700); err != nil {
		return nil, err
	}
	a := &Agent{Opts: o, Config: filepath.Join(n.Opts.Dir, fmt.Sprintf("agent-%s.yaml", RandSuffix())), exited: make(chan struct{})}
	if err := os.WriteFile(a.Config, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	if o.LogFile == "" {
		a.Opts.LogFile = filepath.Join(n.Opts.Dir, fmt.Sprintf("agent-%s.log", RandSuffix()))
	}
	var err error
	if a.log, err = os.Create(a.Opts.LogFile); err != nil {
		return nil, err
	}
	if n.Path == "" { // the machine's own namespace: a real node
		a.Cmd = exec.Command(o.Binary, "--config", a.Config)
	} else {
		a.Cmd = exec.Command("nsenter", "--net="+n.Path, "--", o.Binary, "--config", a.Config)
	}
	a.Cmd.Stdout, a.Cmd.Stderr = a.log, a.log
	a.Cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := a.Cmd.Start(); err != nil {
		a.log.Close()
		return nil, err
	}
	go func() { a.waitErr = a.Cmd.Wait(); close(a.exited) }()
	if err := a.waitServing(ctx, 30*time.Second); err != nil {
		a.Kill()
		return nil, err
	}
	return a, nil
}

func (a *Agent) waitServing(ctx context.Context, max time.Duration) error {
	deadline := time.Now().Add(max)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		select {
		case <-a.exited:
			return fmt.Errorf("ambit-agent exited (%v); log:\n%s", a.waitErr, a.Tail(30))
		default:
		}
		if c, err := net.Dial("unixpacket", a.Opts.Socket); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(30 * time.Millisecond)
	}
	return fmt.Errorf("ambit-agent did not serve %s within %s; log:\n%s", a.Opts.Socket, max, a.Tail(30))
}

// Stop sends SIGTERM (graceful drain) and waits up to max.
func (a *Agent) Stop(max time.Duration) error {
	a.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-a.exited:
	case <-time.After(max):
		a.Kill()
	}
	a.log.Close()
	return nil
}

// Kill is kill -9: no cleanup, no drain.
func (a *Agent) Kill() {
	a.Cmd.Process.Kill()
	<-a.exited
	a.log.Close()
}

// Exited is closed when the process ends.
func (a *Agent) Exited() <-chan struct{} { return a.exited }

// Log returns the agent's whole output so far.
func (a *Agent) Log() string {
	b, _ := os.ReadFile(a.Opts.LogFile)
	return string(b)
}

// Tail returns the last n lines of the agent's output.
func (a *Agent) Tail(n int) string {
	lines := strings.Split(strings.TrimRight(a.Log(), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// WaitReady waits until the agent reports that it has adopted every pod it
// found and serves them (its "agent ready" log line, the same moment its
// /readyz turns ready).
func (a *Agent) WaitReady(max time.Duration) error {
	deadline := time.Now().Add(max)
	for !strings.Contains(a.Log(), `"msg":"agent ready"`) {
		select {
		case <-a.exited:
			return fmt.Errorf("ambit-agent exited (%v); log:\n%s", a.waitErr, a.Tail(30))
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("ambit-agent not ready within %s; log:\n%s", max, a.Tail(30))
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil
}
