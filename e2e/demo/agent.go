package main

import (
	"bufio"
	"os"
	"path/filepath"
	"strings"
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

const policy = `# Only the client's identity may reach the server.
apiVersion: ambit.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {namespace: shop, name: server-from-client}
spec:
  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules:
  - from: {principals: ["cluster.local/ns/shop/sa/client"]}
`

// writeInventory writes the demo's static inventory and its policy
// directory and returns their paths.
func (d *demo) writeInventory() (inv, policyDir string, err error) {
	inv = filepath.Join(d.work, "inventory.yaml")
	if err = os.WriteFile(inv, []byte(inventory), 0o644); err != nil {
		return
	}
	policyDir = filepath.Join(d.work, "policies")
	if err = os.MkdirAll(policyDir, 0o755); err != nil {
		return
	}
	err = os.WriteFile(filepath.Join(policyDir, "server.yaml"), []byte(policy), 0o644)
	return
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
