package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/ambit-mesh/ambit/e2e/lab"
)

const secret = "the-quick-brown-fox-pays-invoice-4711"

type demo struct {
	bin     string // directory with ambit-cni, ambit-agent, ambit-demo
	work    string
	node    *lab.Node
	agent   *lab.Agent
	apps    []*exec.Cmd
	cleanup []func()
	pods    map[string]*lab.Pod
	// pluginLog collects the CNI plugins' stderr, so it does not mix with
	// what the demo tells its reader.
	pluginLog *os.File
}

func say(format string, a ...any)  { fmt.Printf(format+"\n", a...) }
func step(format string, a ...any) { fmt.Printf("\n▶ "+format+"\n", a...) }
func ok(format string, a ...any)   { fmt.Printf("  ✔ "+format+"\n", a...) }

// failures counts the checks that did not hold; the demo exits non-zero
// when any did, so CI can run it as a test.
var failures int

func bad(format string, a ...any) { failures++; fmt.Printf("  ✘ "+format+"\n", a...) }

func runDemo() error {
	if os.Geteuid() != 0 {
		return errors.New("the demo creates network namespaces and firewall rules: run it as root")
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	d := &demo{bin: filepath.Dir(exe), pods: map[string]*lab.Pod{}}
	for _, b := range []string{"ambit-cni", "ambit-agent"} {
		if _, err := os.Stat(filepath.Join(d.bin, b)); err != nil {
			return fmt.Errorf("%s not found next to ambit-demo (run `make build`): %w", b, err)
		}
	}
	if d.work, err = os.MkdirTemp("", "ambit-demo-"); err != nil {
		return err
	}
	d.cleanup = append(d.cleanup, func() {
		if os.Getenv("AMBIT_DEMO_KEEP") != "" {
			say("  (AMBIT_DEMO_KEEP set: logs and capture kept in %s)", d.work)
			return
		}
		os.RemoveAll(d.work)
	})

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- d.run() }()
	select {
	case err = <-done:
	case s := <-sig:
		say("\n%s: cleaning up", s)
		err = fmt.Errorf("interrupted")
	}
	d.close()
	return err
}

func (d *demo) close() {
	for _, c := range d.apps {
		if c.Process != nil {
			c.Process.Kill()
			c.Wait()
		}
	}
	if d.node != nil {
		d.node.Close() // CNI DEL of every pod while the agent still answers
	}
	if d.agent != nil {
		d.agent.Stop(5 * time.Second)
	}
	for i := len(d.cleanup) - 1; i >= 0; i-- {
		d.cleanup[i]()
	}
}

func (d *demo) run() error {
	start := time.Now()
	ctx := context.Background()
	runDir := filepath.Join(d.work, "run")
	sock := filepath.Join(runDir, "cni.sock")

	step("A node: network namespace %q with a bridge, CNI chain bridge + host-local (Debian) + ambit-cni", "ambit-demo-node")
	var err error
	if d.pluginLog, err = os.Create(filepath.Join(d.work, "cni-stderr.log")); err != nil {
		return err
	}
	d.cleanup = append(d.cleanup, func() { d.pluginLog.Close() })
	d.node, err = lab.NewNode(lab.NodeOptions{
		Name:       "ambit-demo-node",
		PodCIDR:    netip.MustParsePrefix("10.77.0.0/24"),
		PluginDirs: []string{"/usr/lib/cni", d.bin},
		CNIVersion: "1.0.0",
		Ambit: map[string]any{
			"agentSocket": sock,
			"logFile":     filepath.Join(d.work, "ambit-cni.log"),
		},
		Dir:          filepath.Join(d.work, "node"),
		PluginStderr: d.pluginLog,
	})
	if err != nil {
		return err
	}
	ok("conflist: %s", filepath.Join(d.work, "node", "10-lab.conflist"))

	step("The agent: static inventory (namespace shop is ambient, legacy is not), local CA, policy: server accepts only sa/client")
	inv, policyDir, err := d.writeInventory()
	if err != nil {
		return err
	}
	d.agent, err = d.node.StartAgent(ctx, lab.AgentOptions{
		Binary:    filepath.Join(d.bin, "ambit-agent"),
		Inventory: inv,
		PolicyDir: policyDir,
		StateDir:  runDir,
		Socket:    sock,
		LogFile:   filepath.Join(d.work, "agent.log"),
	})
	if err != nil {
		return err
	}
	ok("ambit-agent is ready (log: %s)", filepath.Join(d.work, "agent.log"))

	step("Pods, created through the CNI chain exactly as a container runtime would")
	for _, p := range []struct{ ns, name string }{{"shop", "server"}, {"shop", "client"}, {"shop", "intruder"}, {"legacy", "outsider"}} {
		t0 := time.Now()
		pod, err := d.node.AddPod(ctx, p.ns, p.name)
		if err != nil {
			return err
		}
		d.pods[p.name] = pod
		enrolled := "not enrolled (passthrough)"
		if d.enrolled(pod) {
			enrolled = "enrolled: redirection installed, agent listening on 15001/15006/15008 in its netns"
		}
		ok("%-9s %-7s %-12s %s (ADD took %s)", p.name, p.ns, pod.IP, enrolled, time.Since(t0).Round(time.Millisecond))
	}

	for _, name := range []string{"server", "outsider"} {
		c := d.pods[name].Command(ctx, filepath.Join(d.bin, "ambit-demo"), "serve", name, ":8080")
		c.Stdout, c.Stderr = nil, nil
		if err := c.Start(); err != nil {
			return err
		}
		d.apps = append(d.apps, c)
	}
	if err := waitListening(8080, d.pods["server"], d.pods["outsider"]); err != nil {
		return err
	}

	capFile := filepath.Join(d.work, "bridge.pcap")
	capture, err := lab.StartCapture(d.node.Path, "ambit0", capFile)
	if err != nil {
		return err
	}

	step("client → server:8080 (both enrolled). The apps speak plain HTTP; Ambit encrypts.")
	out, err := d.get("client", "server", secret)
	if err != nil {
		bad("request failed: %v", err)
		return err
	}
	say("  server answered: %s", strings.TrimSpace(out))
	clientIP := d.pods["client"].IP.String()
	if strings.Contains(out, "you came from "+clientIP) {
		ok("the server saw the client's own pod IP %s (original source preserved)", clientIP)
	} else {
		bad("the server did not see the client's pod IP %s", clientIP)
	}
	// The agent writes its access-log line when the connection has
	// ended on its side, which may be a moment after the client has its
	// answer.
	id := d.peerIdentity("server")
	for deadline := time.Now().Add(3 * time.Second); id == "" && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
		id = d.peerIdentity("server")
	}
	if id != "" {
		ok("the server's agent accepted it over HBONE mTLS from %s", id)
	}

	step("client → outsider:8080 (outsider is not in the mesh)")
	if out, err := d.get("client", "outsider", "hello outsider"); err != nil {
		bad("passthrough failed: %v", err)
	} else {
		ok("passthrough works, plaintext as the outsider expects: %s", strings.TrimSpace(out))
	}

	step("intruder → server:8080 (enrolled, but policy allows only sa/client)")
	if out, err := d.get("intruder", "server", "let me in"); err == nil {
		bad("the intruder got through: %s", strings.TrimSpace(out))
	} else {
		ok("refused: %v", shortErr(err))
	}

	capture.Stop()
	d.showStatus(ctx)

	step("What crossed the bridge between client and server (capture: %s)", capFile)
	rep, err := lab.Analyze(capFile, []netip.Addr{d.pods["client"].IP}, []netip.Addr{d.pods["server"].IP}, []byte(secret))
	if err != nil {
		return err
	}
	for port, n := range rep.PortsSeen {
		say("  port %-5d %6d payload bytes", port, n)
	}
	if _, only := rep.PortsSeen[15008]; only && len(rep.PortsSeen) == 1 {
		ok("only TLS to port 15008 between the pods (%d segments)", rep.Segments)
	} else {
		bad("traffic to other ports than 15008 was seen")
	}
	if rep.PlaintextFound {
		bad("the payload %q appears in plaintext on the wire", secret)
	} else {
		ok("the payload %q appears nowhere in the capture", secret)
	}
	say("\nDone in %s. Cleaning up (pods, node, agent, rules).", time.Since(start).Round(100*time.Millisecond))
	if failures > 0 {
		return fmt.Errorf("%d check(s) failed; logs: AMBIT_DEMO_KEEP=1 keeps them", failures)
	}
	return nil
}

func shortErr(err error) string {
	s := err.Error()
	if i := strings.LastIndex(s, "\n"); i > 0 {
		s = s[:i]
	}
	if len(s) > 160 {
		s = s[:160] + "…"
	}
	return s
}

func (d *demo) get(from, to, msg string) (string, error) {
	url := fmt.Sprintf("http://%s/", netip.AddrPortFrom(d.pods[to].IP, 8080))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := d.pods[from].Command(ctx, filepath.Join(d.bin, "ambit-demo"), "get", url, msg)
	out, err := c.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%v: %s", err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// waitListening waits until each pod has a listener on port, looking from
// inside the pod (ss), so the check itself involves no mesh traffic.
func waitListening(port int, pods ...*lab.Pod) error {
	for _, p := range pods {
		deadline := time.Now().Add(10 * time.Second)
		for !listening(p, port) {
			if time.Now().After(deadline) {
				return fmt.Errorf("nothing listens on port %d in pod %s", port, p.Name)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return nil
}

func listening(p *lab.Pod, port int) bool {
	out, err := p.Command(context.Background(), "ss", "-Hltn", fmt.Sprintf("sport = :%d", port)).Output()
	return err == nil && strings.TrimSpace(string(out)) != ""
}

// enrolled: the agent holds the HBONE listener inside the pod's netns.
func (d *demo) enrolled(p *lab.Pod) bool { return listening(p, 15008) }
