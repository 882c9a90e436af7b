// Package podman runs Ambit under a real container runtime: rootful podman
// with its CNI network backend, our installer chaining ambit-cni into the
// network's conflist, and containers that podman starts being enrolled and
// talking mTLS — while containers the inventory does not name are left
// alone.
package podman

import (
	"archive/tar"
	"context"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/e2e/lab"
	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/install"
)

type env struct {
	t       *testing.T
	dir     string
	conf    string
	network string
	image   string
}

func (e *env) podman(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	c := exec.CommandContext(ctx, "podman", append(testenv.PodmanGlobalArgs(), args...)...)
	c.Env = append(os.Environ(), "CONTAINERS_CONF="+e.conf)
	out, err := c.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("podman %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

func (e *env) mustPodman(args ...string) string {
	e.t.Helper()
	out, err := e.podman(args...)
	if err != nil {
		e.t.Fatal(err)
	}
	return out
}

// image packs the demo binary (a static Go program: "serve" and "get") as
// the container image, with `podman import` — no registry needed.
func (e *env) buildImage() {
	e.t.Helper()
	bin := filepath.Join(e.dir, "app")
	b := exec.Command("go", "build", "-o", bin, "./e2e/demo")
	b.Dir = testenv.RepoRoot()
	b.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := b.CombinedOutput(); err != nil {
		e.t.Fatalf("building the app: %v\n%s", err, out)
	}
	tarPath := filepath.Join(e.dir, "image.tar")
	f, err := os.Create(tarPath)
	if err != nil {
		e.t.Fatal(err)
	}
	tw := tar.NewWriter(f)
	src, err := os.Open(bin)
	if err != nil {
		e.t.Fatal(err)
	}
	st, _ := src.Stat()
	tw.WriteHeader(&tar.Header{Name: "app", Mode: 0o755, Size: st.Size(), ModTime: time.Unix(0, 0)})
	io.Copy(tw, src)
	src.Close()
	tw.Close()
	f.Close()
	e.image = "localhost/ambit-e2e-app:" + lab.RandSuffix()
	e.mustPodman("import", "--change", `ENTRYPOINT ["/app"]`, tarPath, e.image)
	e.t.Cleanup(func() { e.podman("rmi", "-f", e.image) })
}

func TestPodmanContainersAreEnrolled(t *testing.T) {
	testenv.RequireRoot(t)
	if _, err := exec.LookPath("podman"); err != nil {
		t.Fatalf("podman is required (make deps installs it): %v", err)
	}
	cniBin := testenv.Binary(t, "ambit-cni")
	agentBin := testenv.Binary(t, "ambit-agent")
	dir := t.TempDir()
	e := &env{t: t, dir: dir, conf: filepath.Join(dir, "containers.conf")}
	binDir, netDir := filepath.Join(dir, "cni-bin"), filepath.Join(dir, "net.d")
	for _, d := range []string{binDir, netDir} {
		os.MkdirAll(d, 0o755)
	}
	conf := fmt.Sprintf("[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [%q, \"/usr/lib/cni\"]\nnetwork_config_dir = %q\n", binDir, netDir)
	if err := os.WriteFile(e.conf, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	e.buildImage()

	// The podman network: a bridge in the host namespace, Debian's plugins.
	e.network = "ambit-e2e-" + lab.RandSuffix()
	subnet := netip.MustParsePrefix("10.79.0.0/24")
	e.mustPodman("network", "create", "--subnet", subnet.String(), e.network)
	t.Cleanup(func() { e.podman("network", "rm", "-f", e.network) })
	bridge := strings.TrimSpace(e.mustPodman("network", "inspect", "--format", "{{.NetworkInterface}}", e.network))

	// The agent runs in the host namespace, as the DaemonSet would.
	state := filepath.Join(dir, "state")
	inv := filepath.Join(dir, "inventory.yaml")
	// On a podman host the inventory names the containers to enroll (pod
	// opt-in label); a namespace label would enroll every container.
	os.WriteFile(inv, []byte(`namespaces:
  - name: default
workloads:
  - {namespace: default, name: web, serviceAccount: web, labels: {ambit.dev/dataplane-mode: ambient}}
  - {namespace: default, name: shopper, serviceAccount: shopper, labels: {ambit.dev/dataplane-mode: ambient}}
`), 0o644)
	host := &lab.Node{Opts: lab.NodeOptions{Name: "host", Dir: dir}, Path: ""}
	agent, err := host.StartAgent(context.Background(), lab.AgentOptions{Binary: agentBin, Inventory: inv, StateDir: state})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		agent.Stop(10 * time.Second)
		if t.Failed() {
			t.Logf("agent log:\n%s", agent.Tail(40))
		}
	})

	// Our installer chains ambit-cni into podman's conflist.
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	close(ready)
	installed := make(chan string, 1)
	errc := make(chan error, 1)
	go func() {
		errc <- install.Run(ctx, install.Config{
			CNIBinDir:    binDir,
			CNIConfDir:   netDir,
			PluginSource: cniBin,
			Entry:        install.Entry{Name: "ambit-cni", AgentSocket: filepath.Join(state, "cni.sock"), LogFile: filepath.Join(dir, "cni.log"), DefaultNamespace: "default"},
			Ready:        ready,
			OnInstalled: func(p string) {
				select {
				case installed <- p:
				default:
				}
			},
		})
	}()
	t.Cleanup(func() { cancel(); <-errc })
	select {
	case p := <-installed:
		b, _ := os.ReadFile(p)
		if !strings.Contains(string(b), `"ambit-cni"`) {
			t.Fatalf("installer reported %s but it has no ambit-cni entry:\n%s", p, b)
		}
	case err := <-errc:
		t.Fatalf("installer: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("installer did not chain ambit-cni in 30s")
	}

	run := func(name string, args ...string) string {
		t.Helper()
		base := []string{"run", "-d", "--name", name, "--network", e.network, "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", e.image}
		e.mustPodman(append(base, args...)...)
		t.Cleanup(func() { e.podman("rm", "-f", "-t", "0", name) })
		ip := strings.TrimSpace(e.mustPodman("inspect", "--format", "{{(index .NetworkSettings.Networks \""+e.network+"\").IPAddress}}", name))
		return ip
	}
	webIP := run("web", "serve", "web", ":8080")
	strangerIP := run("stranger", "serve", "stranger", ":8080")

	capture, err := lab.StartCapture("", bridge, filepath.Join(dir, "bridge.pcap"))
	if err != nil {
		t.Fatal(err)
	}
	const secret = "podman-secret-payload-9917"
	var out string
	deadline := time.Now().Add(20 * time.Second)
	for {
		out, err = e.podman("run", "--rm", "--name", "shopper", "--network", e.network, "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", e.image, "get", "http://"+webIP+":8080/", secret)
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	capture.Stop()
	if err != nil {
		t.Fatalf("shopper → web: %v", err)
	}
	if !strings.Contains(out, "hello from web") || !strings.Contains(out, secret) {
		t.Fatalf("shopper got %q", out)
	}
	rep, err := lab.Analyze(capture.File, []netip.Addr{netip.MustParseAddr(webIP)}, nil, []byte(secret))
	if err != nil {
		t.Fatal(err)
	}
	if rep.PlaintextFound {
		t.Fatal("the payload crossed podman's bridge in plaintext")
	}
	// A container the inventory does not name is not enrolled: reachable
	// in plaintext from the host, and no agent listener in its netns.
	if out, err := exec.Command("curl", "-s", "-m", "5", "-d", "x", "http://"+strangerIP+":8080/").CombinedOutput(); err != nil || !strings.Contains(string(out), "hello from stranger") {
		t.Fatalf("stranger not reachable as a plain container: %v %s", err, out)
	}
	pid := strings.TrimSpace(e.mustPodman("inspect", "--format", "{{.State.Pid}}", "stranger"))
	ss, _ := exec.Command("nsenter", "-t", pid, "-n", "ss", "-Hltn", "sport = :15008").Output()
	if strings.TrimSpace(string(ss)) != "" {
		t.Fatalf("a container outside the inventory got an HBONE listener: %s", ss)
	}
	pid = strings.TrimSpace(e.mustPodman("inspect", "--format", "{{.State.Pid}}", "web"))
	ss, _ = exec.Command("nsenter", "-t", pid, "-n", "ss", "-Hltn", "sport = :15008").Output()
	if strings.TrimSpace(string(ss)) == "" {
		t.Fatal("the enrolled container web has no HBONE listener in its netns")
	}
	t.Log("podman: shopper → web over HBONE; the payload never crossed the bridge in plaintext; stranger untouched")
}
