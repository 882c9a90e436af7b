package install_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/install"
	"github.com/ambit-mesh/ambit/node-agent/install/conflist"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

func randHex(t *testing.T, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

func netnsAdd(t *testing.T) string {
	t.Helper()
	name := "amb-ins-" + randHex(t, 4)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	return "/var/run/netns/" + name
}

// agent is a stand-in ambit-agent: the real protocol server on a real
// socket, answering "skip" and recording what it was asked.
type agent struct {
	mu   sync.Mutex
	reqs []cniproto.Request
}

func (a *agent) handle(_ context.Context, r *cniproto.Request, netns *os.File) *cniproto.Response {
	if netns != nil {
		netns.Close()
	}
	a.mu.Lock()
	a.reqs = append(a.reqs, *r)
	a.mu.Unlock()
	return &cniproto.Response{Version: cniproto.Version, Decision: cniproto.Skip}
}

func (a *agent) adds() []cniproto.Request {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []cniproto.Request
	for _, r := range a.reqs {
		if r.Op == cniproto.OpAdd {
			out = append(out, r)
		}
	}
	return out
}

// After the installer chains ambit-cni into a bridge network, the
// runtime's own library (libcni, as containerd and CRI-O use it) loads the
// rewritten config and runs ADD through the reference plugins and the
// real ambit-cni binary, which asks the agent about the pod; after
// uninstall, ADD runs without it. Against both reference plugin sets: old
// nodes (spec ≤ 1.0.0) and current ones (1.1.0).
func TestRuntimeRunsInstalledChain(t *testing.T) {
	testenv.RequireRoot(t)
	plugin := testenv.Binary(t, "ambit-cni")
	for i, set := range testenv.PluginSets(t) {
		t.Run(set.Name, func(t *testing.T) {
			root := t.TempDir()
			binDir, confDir, state := filepath.Join(root, "bin"), filepath.Join(root, "net.d"), filepath.Join(root, "state")
			for _, d := range []string{binDir, confDir, state} {
				if err := os.MkdirAll(d, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			br := "ai" + randHex(t, 4)
			subnet := fmt.Sprintf("10.213.%d.0/24", 10+i)
			t.Cleanup(func() { exec.Command("ip", "link", "del", br).Run() })
			primary := filepath.Join(confDir, "10-bridge.conflist")
			conf := fmt.Sprintf(`{
  "cniVersion": %q,
  "name": "amb-ins-net",
  "plugins": [
    {"type": "bridge", "bridge": %q, "isGateway": false, "ipMasq": false,
     "ipam": {"type": "host-local", "subnet": %q, "dataDir": %q}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
`, set.MaxCNIVersion, br, subnet, filepath.Join(state, "ipam"))
			if err := os.WriteFile(primary, []byte(conf), 0o644); err != nil {
				t.Fatal(err)
			}

			sock := filepath.Join(root, "cni.sock")
			l, err := cniproto.Listen(sock)
			if err != nil {
				t.Fatal(err)
			}
			ag := &agent{}
			srv := &cniproto.Server{Handler: ag.handle}
			ctx, cancel := context.WithCancel(context.Background())
			served := make(chan struct{})
			go func() { defer close(served); srv.Serve(ctx, l) }()
			t.Cleanup(func() { cancel(); <-served })

			ready := make(chan struct{})
			close(ready)
			installed := make(chan string, 16)
			cfg := install.Config{
				CNIBinDir: binDir, CNIConfDir: confDir, PluginSource: plugin, Ready: ready,
				Entry: install.Entry{AgentSocket: sock, LogFile: filepath.Join(root, "cni.log"), SnapshotFile: filepath.Join(root, "snapshot")},
				OnState: func(ok bool, p string) {
					if ok {
						select {
						case installed <- p:
						default:
						}
					}
				},
				Logger: slog.New(slog.NewTextHandler(t.Output(), nil)),
			}
			ictx, icancel := context.WithCancel(ctx)
			runDone := make(chan error, 1)
			go func() { runDone <- install.Run(ictx, cfg) }()
			select {
			case p := <-installed:
				if p != primary {
					t.Fatalf("installed into %s", p)
				}
			case err := <-runDone:
				t.Fatalf("Run: %v", err)
			case <-time.After(20 * time.Second):
				t.Fatal("installer did not install")
			}
			icancel()
			if err := <-runDone; err != nil {
				t.Fatal(err)
			}

			cni := libcni.NewCNIConfigWithCacheDir([]string{set.Dir, binDir}, filepath.Join(state, "cache"), nil)
			add := func(id string) (*current.Result, func()) {
				t.Helper()
				list, err := libcni.ConfListFromFile(primary)
				if err != nil {
					t.Fatalf("libcni cannot load the installed config: %v", err)
				}
				netns := netnsAdd(t)
				rt := &libcni.RuntimeConf{
					ContainerID: id, NetNS: netns, IfName: "eth0",
					Args: [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", "shop"}, {"K8S_POD_NAME", "web-" + id}, {"K8S_POD_UID", "uid-" + id}, {"K8S_POD_INFRA_CONTAINER_ID", id}},
				}
				res, err := cni.AddNetworkList(context.Background(), list, rt)
				if err != nil {
					t.Fatalf("ADD through the installed chain: %v", err)
				}
				r, err := current.NewResultFromResult(res)
				if err != nil {
					t.Fatal(err)
				}
				return r, func() {
					if err := cni.DelNetworkList(context.Background(), list, rt); err != nil {
						t.Errorf("DEL: %v", err)
					}
				}
			}

			res, del := add("c1")
			_, ipnet, _ := net.ParseCIDR(subnet)
			if len(res.IPs) != 1 || !ipnet.Contains(res.IPs[0].Address.IP) {
				t.Fatalf("ADD result IPs %v, want one in %s", res.IPs, subnet)
			}
			adds := ag.adds()
			if len(adds) != 1 || adds[0].Pod.Namespace != "shop" || adds[0].Pod.Name != "web-c1" || len(adds[0].Pod.IPs) != 1 || adds[0].Pod.IPs[0].Addr().String() != res.IPs[0].Address.IP.String() {
				t.Fatalf("agent was asked %+v, want one ADD for shop/web-c1 at %s", adds, res.IPs[0].Address.IP)
			}
			del()

			if err := install.Uninstall(context.Background(), cfg); err != nil {
				t.Fatal(err)
			}
			if b, _ := os.ReadFile(primary); string(b) != conf {
				t.Fatalf("uninstall did not restore the config:\n%s", b)
			}
			if _, err := os.Stat(filepath.Join(binDir, "ambit-cni")); !os.IsNotExist(err) {
				t.Fatal("binary left behind")
			}
			res, del = add("c2")
			defer del()
			if n := len(ag.adds()); n != 1 {
				t.Fatalf("agent asked %d times; after uninstall it must not be asked", n)
			}
			if len(res.IPs) != 1 {
				t.Fatalf("ADD after uninstall: %v", res)
			}
			if p, _, _ := conflist.FindPrimary(confDir); p == nil || strings.Contains(string(p.Data), "ambit-cni") {
				t.Fatal("primary still names ambit-cni")
			}
		})
	}
}
