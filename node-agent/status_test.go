package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/admin"
	"github.com/ambit-mesh/ambit/node-agent/instance"
)

// statusCmd runs `ambit-agent status args...` and returns its stdout;
// ok false when it exited non-zero (stderr then in the output).
func statusCmd(t *testing.T, bin string, args ...string) (string, bool) {
	t.Helper()
	cmd := exec.Command(bin, append([]string{"status"}, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		return out.String() + errb.String(), false
	}
	return out.String(), true
}

// TestStatusCommand runs the built binary as an operator does: `run` on
// a static inventory, a pod enrolled at ADD, then `ambit-agent status`
// in every form. It finds the agent through the registry, shows the pod
// enrolled with its IP and certificate, prints the JSON document the
// client reads back strictly, serves it on a 0600 socket, and the socket
// goes with the agent.
func TestStatusCommand(t *testing.T) {
	testenv.RequireRoot(t)
	bin := testenv.Binary(t, "ambit-agent")
	health := healthAddr(15934)
	dir, cfg := staticNode(t, "amb-st-", func(string) string { return "healthAddr: " + health + "\ndrainTimeout: 1s\n" })
	file := filepath.Join(dir, "agent.instance")
	cmd := startProcess(t, bin, "run", "-config", cfg, "--instance-file", file)
	waitReady(t, health)
	newTestPod(t, "web", "10.75.0", false).add(t, filepath.Join(dir, "cni.sock"))

	name, err := instance.ReadName(file)
	if err != nil {
		t.Fatal(err)
	}
	sock := admin.SocketPath(dir, name)
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("admin socket %s: %v %v, want mode 0600", sock, fi, err)
	}

	out, ok := statusCmd(t, bin, "-config", cfg)
	if !ok {
		t.Fatalf("status: %s", out)
	}
	f := row(out, "apps", "web")
	if len(f) < 10 || f[2] != "10.75.0.2" || f[3] != "enrolled" || f[5] != "15001,15006,15008" || f[7] != "ns/apps/sa/default" || f[9] == "-" {
		t.Fatalf("no enrolled web row with its IP, listeners, identity and certificate:\n%s", out)
	}
	if !strings.Contains(out, name) || !strings.Contains(out, "node n1") || !strings.Contains(out, "ready") {
		t.Fatalf("the header does not name the agent that answered (%s):\n%s", name, out)
	}

	// JSON: the document, read back strictly; the view does not change it.
	js, ok := statusCmd(t, bin, "certs", "-o", "json", "--state-dir", dir)
	if !ok {
		t.Fatalf("status -o json: %s", js)
	}
	st, err := admin.Decode([]byte(js))
	if err != nil {
		t.Fatalf("decoding the JSON output: %v\n%s", err, js)
	}
	if st.Agent.Instance != name || len(st.Certificates) != 1 || st.Certificates[0].Identity != "spiffe://cluster.local/ns/apps/sa/default" ||
		len(st.TrustBundle) != 1 || len(st.Pods) != 1 || st.Pods[0].State != admin.StateEnrolled {
		t.Fatalf("JSON document: %s", js)
	}
	if !st.Pods[0].CertNotAfter.Equal(st.Certificates[0].NotAfter) || st.Certificates[0].NotAfter.IsZero() {
		t.Fatalf("pod's certificate end %v, certificate's %v", st.Pods[0].CertNotAfter, st.Certificates[0].NotAfter)
	}

	certs, ok1 := statusCmd(t, bin, "certs", "--state-dir", dir)
	conns, ok2 := statusCmd(t, bin, "--state-dir", dir, "conns")
	byFile, ok3 := statusCmd(t, bin, "--state-dir", dir, "--instance-file", file, "-o", "json")
	all, ok4 := statusCmd(t, bin, "--state-dir", dir, "--all", "-o", "json")
	if !ok1 || !ok2 || !ok3 || !ok4 {
		t.Fatalf("status views:\n%s\n%s\n%s\n%s", certs, conns, byFile, all)
	}
	if !strings.Contains(certs, st.Certificates[0].Serial) || !strings.Contains(certs, st.TrustBundle[0].SHA256) {
		t.Fatalf("certs view:\n%s", certs)
	}
	if !strings.Contains(conns, "TOTAL") || !hasRow(conns, "apps", "web") {
		t.Fatalf("conns view:\n%s", conns)
	}
	var list []json.RawMessage
	if err := json.Unmarshal([]byte(all), &list); err != nil || len(list) != 1 {
		t.Fatalf("--all -o json: %v\n%s", err, all)
	}
	for _, o := range []string{out, js, certs, conns, byFile, all} {
		if strings.Contains(o, "PRIVATE KEY") || strings.Contains(strings.ToLower(o), "token") {
			t.Fatalf("status output holds a secret:\n%s", o)
		}
	}
	if out, ok := statusCmd(t, bin, "--state-dir", dir, "workloads"); ok || !strings.Contains(out, "unknown view") {
		t.Fatalf("an unknown view: %s", out)
	}

	stopBySIGTERM(t, cmd)
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Fatalf("admin socket left after the agent stopped: %v", err)
	}
	if out, ok := statusCmd(t, bin, "--state-dir", dir); ok || !strings.Contains(out, "no agent runs") {
		t.Fatalf("status with no agent running: %s", out)
	}
}

// row is the fields of the table line that starts with namespace and
// pod, nil if none.
func row(table, namespace, pod string) []string {
	for _, l := range strings.Split(table, "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == namespace && f[1] == pod {
			return f
		}
	}
	return nil
}

func hasRow(table, namespace, pod string) bool { return row(table, namespace, pod) != nil }
