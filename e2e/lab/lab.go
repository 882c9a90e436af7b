package lab

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
)

// NodeOptions describe one simulated node.
type NodeOptions struct {
	// Name is the node's network namespace name (unique on the machine).
	Name string
	// PodCIDR is the pod subnet host-local allocates from; the bridge
	// gets its first address as the pods' gateway.
	PodCIDR netip.Prefix
	// Bridge is the bridge device name inside the node (default ambit0).
	Bridge string
	// PluginDirs are searched for CNI plugins: the reference plugins and
	// the directory holding ambit-cni.
	PluginDirs []string
	// CNIVersion of the conflist (1.0.0 for Debian's plugins, 1.1.0 for
	// current ones).
	CNIVersion string
	// Ambit, when non-nil, is appended to the conflist as the ambit-cni
	// entry (fields other than type).
	Ambit map[string]any
	// Dir holds the node's files (conflist, CNI cache, host-local state).
	// Empty: a temporary directory that Close removes.
	Dir string
	// PluginStderr receives the CNI plugins' stderr (default: ours).
	PluginStderr io.Writer
}

// Node is a network namespace playing a Kubernetes node: its own bridge,
// its own CNI chain, its own agent.
type Node struct {
	Opts    NodeOptions
	NetNS   ns.NetNS
	Path    string // /run/netns/<name>
	Conf    *libcni.NetworkConfigList
	ConfRaw []byte
	cni     *libcni.CNIConfig

	mu   sync.Mutex
	pods map[string]*Pod
	// tempDir: Opts.Dir was made by NewNode, so Close removes it (every
	// run left one in /tmp otherwise: 216 of them after a few days).
	tempDir bool
}

// Pod is a sandbox created through the node's CNI chain.
type Pod struct {
	Namespace   string
	Name        string
	UID         string
	ContainerID string
	NetnsName   string
	Path        string
	NetNS       ns.NetNS
	IP          netip.Addr
	Result      *types100.Result
	node        *Node
}

// RandSuffix returns a short random hex string for unique names.
func RandSuffix() string {
	var b [3]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// NewNode creates the node's namespace and conflist. Close removes it.
func NewNode(o NodeOptions) (*Node, error) {
	if o.Bridge == "" {
		o.Bridge = "ambit0"
	}
	if o.CNIVersion == "" {
		o.CNIVersion = "1.0.0"
	}
	tempDir := o.Dir == ""
	if tempDir {
		d, err := os.MkdirTemp("", "ambit-lab-"+o.Name+"-")
		if err != nil {
			return nil, err
		}
		o.Dir = d
	}
	if err := os.MkdirAll(o.Dir, 0o755); err != nil {
		return nil, err
	}
	if err := run("ip", "netns", "add", o.Name); err != nil {
		if tempDir {
			os.RemoveAll(o.Dir)
		}
		return nil, err
	}
	n := &Node{Opts: o, Path: "/run/netns/" + o.Name, pods: map[string]*Pod{}, tempDir: tempDir}
	var err error
	if n.NetNS, err = ns.GetNS(n.Path); err != nil {
		n.Close()
		return nil, err
	}
	if err := n.Exec("ip", "link", "set", "lo", "up"); err != nil {
		n.Close()
		return nil, err
	}
	if err := n.Exec("sysctl", "-qw", "net.ipv4.ip_forward=1"); err != nil {
		n.Close()
		return nil, err
	}
	n.ConfRaw, err = n.conflist()
	if err != nil {
		n.Close()
		return nil, err
	}
	if n.Conf, err = libcni.ConfListFromBytes(n.ConfRaw); err != nil {
		n.Close()
		return nil, fmt.Errorf("lab: conflist: %w", err)
	}
	var exec invoke.Exec
	if o.PluginStderr != nil {
		exec = &invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: o.PluginStderr}}
	}
	n.cni = libcni.NewCNIConfigWithCacheDir(o.PluginDirs, filepath.Join(o.Dir, "cache"), exec)
	return n, nil
}

func (n *Node) conflist() ([]byte, error) {
	o := n.Opts
	gw := o.PodCIDR.Masked().Addr().Next()
	plugins := []map[string]any{
		{
			"type":      "bridge",
			"bridge":    o.Bridge,
			"isGateway": true,
			"ipMasq":    false,
			"ipam": map[string]any{
				"type":    "host-local",
				"dataDir": filepath.Join(o.Dir, "ipam"),
				"ranges":  [][]map[string]any{{{"subnet": o.PodCIDR.Masked().String(), "gateway": gw.String()}}},
				"routes":  []map[string]any{{"dst": "0.0.0.0/0"}},
			},
		},
		{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}},
	}
	if o.Ambit != nil {
		e := map[string]any{"type": "ambit-cni"}
		for k, v := range o.Ambit {
			e[k] = v
		}
		plugins = append(plugins, e)
	}
	b, err := json.MarshalIndent(map[string]any{
		"cniVersion": o.CNIVersion,
		"name":       "lab-" + o.Name,
		"plugins":    plugins,
	}, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(o.Dir, "10-lab.conflist"), b, 0o644); err != nil {
		return nil, err
	}
	return b, nil
}

// Exec runs a command inside the node's network namespace.
func (n *Node) Exec(argv ...string) error {
	return run(append([]string{"nsenter", "--net=" + n.Path, "--"}, argv...)...)
}

// Command returns an unstarted command that runs inside the node.
func (n *Node) Command(ctx context.Context, argv ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + n.Path, "--"}, argv...)...)
}

// AddPod creates a pod sandbox: a fresh netns, then CNI ADD through the
// node's whole chain, exactly as a runtime does.
func (n *Node) AddPod(ctx context.Context, namespace, name string) (*Pod, error) {
	p := &Pod{
		Namespace:   namespace,
		Name:        name,
		UID:         "uid-" + namespace + "-" + name + "-" + RandSuffix(),
		ContainerID: "c" + RandSuffix() + RandSuffix(),
		node:        n,
	}
	p.NetnsName = n.Opts.Name + "-" + name
	if len(p.NetnsName) > 60 {
		p.NetnsName = p.NetnsName[:60]
	}
	p.Path = "/run/netns/" + p.NetnsName
	if err := run("ip", "netns", "add", p.NetnsName); err != nil {
		return nil, err
	}
	var err error
	if p.NetNS, err = ns.GetNS(p.Path); err != nil {
		run("ip", "netns", "del", p.NetnsName)
		return nil, err
	}
	res, err := n.cniAdd(ctx, p)
	if err != nil {
		p.NetNS.Close()
		run("ip", "netns", "del", p.NetnsName)
		return nil, err
	}
	p.Result = res
	for _, ipc := range res.IPs {
		if a, ok := netip.AddrFromSlice(ipc.Address.IP); ok {
			p.IP = a.Unmap()
			break
		}
	}
	n.mu.Lock()
	n.pods[p.UID] = p
	n.mu.Unlock()
	return p, nil
}

func (n *Node) rt(p *Pod) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{
		ContainerID: p.ContainerID,
		NetNS:       p.Path,
		IfName:      "eth0",
		Args: [][2]string{
			{"IgnoreUnknown", "true"},
			{"K8S_POD_NAMESPACE", p.Namespace},
			{"K8S_POD_NAME", p.Name},
			{"K8S_POD_INFRA_CONTAINER_ID", p.ContainerID},
			{"K8S_POD_UID", p.UID},
		},
	}
}

func (n *Node) cniAdd(ctx context.Context, p *Pod) (*types100.Result, error) {
	var res *types100.Result
	err := n.NetNS.Do(func(ns.NetNS) error {
		r, err := n.cni.AddNetworkList(ctx, n.Conf, n.rt(p))
		if err != nil {
			return err
		}
		res, err = types100.NewResultFromResult(r)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("CNI ADD %s/%s: %w", p.Namespace, p.Name, err)
	}
	return res, nil
}

// Check runs CNI CHECK for the pod.
func (p *Pod) Check(ctx context.Context) error {
	return p.node.NetNS.Do(func(ns.NetNS) error {
		return p.node.cni.CheckNetworkList(ctx, p.node.Conf, p.node.rt(p))
	})
}

// Delete runs CNI DEL and removes the pod's namespace.
func (p *Pod) Delete(ctx context.Context) error {
	n := p.node
	err := n.NetNS.Do(func(ns.NetNS) error {
		return n.cni.DelNetworkList(ctx, n.Conf, n.rt(p))
	})
	p.NetNS.Close()
	if e := run("ip", "netns", "del", p.NetnsName); e != nil && err == nil {
		err = e
	}
	n.mu.Lock()
	delete(n.pods, p.UID)
	n.mu.Unlock()
	return err
}

// Exec runs a command inside the pod's network namespace.
func (p *Pod) Exec(argv ...string) error {
	return run(append([]string{"nsenter", "--net=" + p.Path, "--"}, argv...)...)
}

// Command returns an unstarted command that runs inside the pod.
func (p *Pod) Command(ctx context.Context, argv ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + p.Path, "--"}, argv...)...)
}

// Close deletes every pod (CNI DEL, best effort) and the node.
func (n *Node) Close() error {
	n.mu.Lock()
	pods := make([]*Pod, 0, len(n.pods))
	for _, p := range n.pods {
		pods = append(pods, p)
	}
	n.mu.Unlock()
	var errs []error
	for _, p := range pods {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		if err := p.Delete(ctx); err != nil {
			errs = append(errs, err)
		}
		cancel()
	}
	if n.NetNS != nil {
		n.NetNS.Close()
	}
	if err := run("ip", "netns", "del", n.Opts.Name); err != nil {
		errs = append(errs, err)
	}
	if n.tempDir {
		if err := os.RemoveAll(n.Opts.Dir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func run(argv ...string) error {
	out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(argv, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
