package main

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

const inventory = `# Who runs on this demo node. Namespace "shop" is in the mesh; "legacy" is not.
namespaces:
  - name: shop
    labels: {ambit.dev/dataplane-mode: ambient}
  - name: legacy
workloads:
  - {namespace: shop, name: server, serviceAccount: server, labels: {app: server}}
  - {namespace: shop, name: client, serviceAccount: client, labels: {app: client}}
  - {namespace: shop, name: intruder, serviceAccount: intruder, labels: {app: intruder}}
  - {namespace: legacy, name: outsider, serviceAccount: default, labels: {app: outsider}}
`

// writeAgentFiles writes the inventory, the policy and the agent's config
// into the demo's work directory and returns the config path.
func (d *demo) writeAgentFiles(runDir, sock string) (string, error) {
	if err := os.MkdirAll(runDir, 0o700); err != nil {
		return "", err
	}
	inv := filepath.Join(d.work, "inventory.yaml")
	if err := os.WriteFile(inv, []byte(inventory), 0o644); err != nil {
		return "", err
	}
	cfg := filepath.Join(d.work, "agent.yaml")
	body := fmt.Sprintf(`nodeName: demo-node
source: inventory
inventoryFile: %s
stateDir: %s
socket: %s
healthAddr: 127.0.0.1:0
logFormat: json
`, inv, runDir, sock)
	return cfg, os.WriteFile(cfg, []byte(body), 0o644)
}

// startAgent starts ambit-agent inside the node (host network of the node,
// like the DaemonSet) and waits until it serves the plugin socket.
func (d *demo) startAgent(ctx context.Context, cfg, sock string) error {
	logf, err := os.Create(filepath.Join(d.work, "agent.log"))
	if err != nil {
		return err
	}
	d.cleanup = append(d.cleanup, func() { logf.Close() })
	d.agent = d.node.Command(ctx, filepath.Join(d.bin, "ambit-agent"), "--config", cfg)
	d.agent.Stdout, d.agent.Stderr = logf, logf
	if err := d.agent.Start(); err != nil {
		return err
	}
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := net.Dial("unixpacket", sock); err == nil {
			c.Close()
			return nil
		}
		if d.agent.ProcessState != nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("ambit-agent did not start serving %s; its log:\n%s", sock, tail(filepath.Join(d.work, "agent.log"), 20))
}

// peerIdentity finds the client identity in the agent's access log for the
// last connection to the named workload.
func (d *demo) peerIdentity(dst string) string {
	f, err := os.Open(filepath.Join(d.work, "agent.log"))
	if err != nil {
		return ""
	}
	defer f.Close()
	id := ""
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 64<<10), 1<<20)
	for s.Scan() {
		l := s.Text()
		if !strings.Contains(l, "spiffe://") || !strings.Contains(l, dst) {
			continue
		}
		for _, f := range strings.FieldsFunc(l, func(r rune) bool { return r == '"' || r == ' ' || r == '=' }) {
			if strings.HasPrefix(f, "spiffe://") && strings.Contains(f, "/sa/client") {
				id = f
			}
		}
	}
	return id
}

func tail(file string, n int) string {
	b, _ := os.ReadFile(file)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
