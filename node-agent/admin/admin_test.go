package admin

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testca"
	"github.com/ambit-mesh/ambit/node-agent/identity"
	"github.com/ambit-mesh/ambit/node-agent/instance"
)

// sources is a Status source with every part filled, from a real CA.
func sources(t *testing.T) (Sources, *testca.CA, *x509.Certificate) {
	t.Helper()
	ca, err := testca.New("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	id := ca.ID("apps", "web")
	cert, err := ca.Issue(id, testca.IssueOptions{})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().UTC().Truncate(time.Second)
	return Sources{
		Agent: func() Agent {
			return Agent{Instance: "00000000000000000001-abcd", PID: 42, Node: "n1", Source: "inventory", Started: now.Add(-time.Hour), Now: now, Ready: true}
		},
		Pods: func(context.Context) []Pod {
			return []Pod{
				{Namespace: "apps", Name: "web", UID: "u1", ContainerID: "c1", IPs: []netip.Addr{netip.MustParseAddr("10.1.0.2")},
					State: StateEnrolled, Since: now.Add(-time.Minute), Backend: "nftables", Listeners: []uint16{15001, 15006, 15008},
					Rules:    &RuleCheck{At: now.Add(-10 * time.Second), Result: RulesRepaired, Problem: "chain AMBIT_OUTPUT missing"},
					Identity: id, Connections: &PodConnections{InboundHBONE: 2, InboundPlaintext: 1, OutboundHBONE: 3, OutboundPassthrough: 4, Held: 10, HBONEConnectionsIn: 1, HBONEConnectionsOut: 1}},
				{Namespace: "apps", Name: "bad", IPs: []netip.Addr{netip.MustParseAddr("10.1.0.3")}, State: StateFailed, Reason: "PortConflict",
					Message: "port 15006 in use by nginx\nsecond line", Since: now},
				{Namespace: "a-first", Name: "pending", State: StatePending, Reason: "NoSandbox"},
			}
		},
		Certificates: func() []identity.CertState {
			return []identity.CertState{{Identity: id, Leaf: cert.Leaf, Pods: 1, NextFetch: now.Add(30 * time.Minute)},
				{Identity: ca.ID("apps", "broken"), Failures: 3, LastError: "CA answered 503", LastFailure: now.Add(-time.Second)}}
		},
		Roots:       func() []*x509.Certificate { return []*x509.Certificate{ca.Cert} },
		Connections: func() (int, int) { return 12, 1000 },
	}, ca, cert.Leaf
}

// TestStatusDocument: the Status the server builds joins the parts (each
// pod's certificate end from the certificates, the totals from the
// pods), sorts pods, fingerprints roots as openssl does, and survives a
// JSON round trip unchanged.
func TestStatusDocument(t *testing.T) {
	src, ca, leaf := sources(t)
	s := &Server{src: src}
	st := s.Status(context.Background())
	if st.Version != Version || len(st.Pods) != 3 {
		t.Fatalf("status: %+v", st)
	}
	if st.Pods[0].Namespace != "a-first" || st.Pods[1].Name != "bad" || st.Pods[2].Name != "web" {
		t.Fatalf("pods not sorted: %v %v %v", st.Pods[0].Name, st.Pods[1].Name, st.Pods[2].Name)
	}
	web := st.Pods[2]
	if !web.CertNotAfter.Equal(leaf.NotAfter) {
		t.Fatalf("web's certificate ends %v, its certificate %v", web.CertNotAfter, leaf.NotAfter)
	}
	if st.Pods[0].IPs == nil {
		t.Fatal("a pod without IPs has null ips, not []")
	}
	c := st.Certificates[0]
	if c.Serial != leaf.SerialNumber.Text(16) || c.Issuer != ca.Cert.Subject.String() || c.Pods != 1 {
		t.Fatalf("certificate: %+v", c)
	}
	sum := sha256.Sum256(ca.Cert.Raw)
	if len(st.TrustBundle) != 1 || st.TrustBundle[0].SHA256 != hex.EncodeToString(sum[:]) {
		t.Fatalf("trust bundle: %+v", st.TrustBundle)
	}
	if got := st.Connections; got.Pods.Held != 10 || got.Pods.In() != 3 || got.Pods.Out() != 7 || got.Held != 12 || got.Budget != 1000 {
		t.Fatalf("connections: %+v", got)
	}

	b, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	back, err := Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	b2, _ := json.Marshal(back)
	if !bytes.Equal(b, b2) {
		t.Fatalf("JSON round trip changed the document:\n%s\n%s", b, b2)
	}
}

// TestDecodeStrict: the client refuses what is not its own document
// rather than show part of a picture.
func TestDecodeStrict(t *testing.T) {
	for _, c := range []struct{ name, doc, want string }{
		{"unknown field", `{"version":1,"agent":{},"pods":[],"extra":1}`, "unknown field"},
		{"unknown pod field", `{"version":1,"pods":[{"namespace":"a","name":"b","ips":[],"state":"enrolled","color":"red"}]}`, "unknown field"},
		{"other version", `{"version":2,"pods":[]}`, "version 2"},
		{"no version", `{"pods":[]}`, "version 0"},
		{"trailing data", `{"version":1} {"version":1}`, "after top-level value"},
		{"not JSON", `<html>`, "invalid character"},
		{"bad IP", `{"version":1,"pods":[{"ips":["10.0.0.300"]}]}`, "ParseAddr"},
	} {
		if _, err := Decode([]byte(c.doc)); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error with %q", c.name, err, c.want)
		}
	}
}

// TestRenderTables: each view's table names what a person looks for, a
// failure's whole message below the table on one line.
func TestRenderTables(t *testing.T) {
	src, _, leaf := sources(t)
	st := (&Server{src: src}).Status(context.Background())
	var b strings.Builder
	if err := Render(&b, &st, ""); err != nil {
		t.Fatal(err)
	}
	pods := b.String()
	for _, want := range []string{"NAMESPACE", "CERT EXPIRES", "10.1.0.2", "enrolled", "nftables", "15001,15006,15008",
		"repaired/10s", "ns/apps/sa/web", "3/7", "failed: PortConflict", "port 15006 in use by nginx second line",
		"pending: NoSandbox", "1 enrolled, 1 pending, 1 failed", "ready"} {
		if !strings.Contains(pods, want) {
			t.Errorf("pods view lacks %q:\n%s", want, pods)
		}
	}
	b.Reset()
	Render(&b, &st, ViewCerts)
	certs := b.String()
	for _, want := range []string{leaf.SerialNumber.Text(16), leaf.NotAfter.UTC().Format(time.RFC3339), "ambit test root",
		"3 failed fetches", "CA answered 503", "trust bundle: 1 roots", st.TrustBundle[0].SHA256} {
		if !strings.Contains(certs, want) {
			t.Errorf("certs view lacks %q:\n%s", want, certs)
		}
	}
	b.Reset()
	Render(&b, &st, ViewConns)
	conns := b.String()
	for _, want := range []string{"IN HBONE", "OUT PASSTHROUGH", "TOTAL", "holds 12 connections", "budget 1000"} {
		if !strings.Contains(conns, want) {
			t.Errorf("conns view lacks %q:\n%s", want, conns)
		}
	}
	if err := Render(io.Discard, &st, "workloads"); err == nil {
		t.Error("an unknown view rendered")
	}
}

func shortDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "amb-adm-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func unixClient(path string) *http.Client {
	return &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	}}}
}

// TestSocketReadOnlyAndPrivate: the socket is 0600 in a 0700 directory,
// answers GET (and HEAD) on /v1/status only, refuses every other method
// and path, and is gone after Close.
func TestSocketReadOnlyAndPrivate(t *testing.T) {
	src, _, _ := sources(t)
	dir := shortDir(t)
	path := SocketPath(dir, "00000000000000000001-abcd")
	s, err := Listen(path, src, nil)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, want a socket 0600", fi.Mode())
	}
	if di, _ := os.Stat(filepath.Dir(path)); di.Mode().Perm() != 0o700 {
		t.Fatalf("socket directory mode %v, want 0700", di.Mode().Perm())
	}
	c := unixClient(path)
	for _, m := range []string{http.MethodPost, http.MethodPut, http.MethodDelete, http.MethodPatch, "OPTIONS", "TRACE"} {
		req, _ := http.NewRequest(m, "http://agent"+StatusPath, strings.NewReader("{}"))
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusMethodNotAllowed || resp.Header.Get("Allow") != "GET, HEAD" {
			t.Errorf("%s: %s (Allow %q), want 405", m, resp.Status, resp.Header.Get("Allow"))
		}
	}
	for _, p := range []string{"/", "/v1/status/", "/debug/pprof/", "/config_dump", "/v1/status?view=all"} {
		resp, err := c.Get("http://agent" + p)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			t.Errorf("GET %s answered 200", p)
		}
	}
	st, err := Fetch(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Pods) != 3 || st.Agent.PID != 42 {
		t.Fatalf("fetched %+v", st)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Fatalf("socket left after Close: %v", err)
	}
	if _, err := Fetch(context.Background(), path); err == nil || !strings.Contains(err.Error(), "no admin socket") {
		t.Fatalf("fetch from a closed agent: %v", err)
	}
}

// TestPeerCheckRefusesOtherUsers: a user other than root and the agent's
// is refused even when the socket's mode would let it in (changed by
// hand).
func TestPeerCheckRefusesOtherUsers(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: connects as another user (nobody) (SKIPPED: not root)")
	}
	src, _, _ := sources(t)
	dir := shortDir(t)
	path := SocketPath(dir, "00000000000000000001-abcd")
	s, err := Listen(path, src, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	os.Chmod(dir, 0o755)
	os.Chmod(filepath.Dir(path), 0o755)
	os.Chmod(path, 0o666)
	// The test binary as nobody, connecting and reading what it is told.
	out, err := runAsNobody(t, path)
	if err == nil || strings.Contains(out, `"version"`) {
		t.Fatalf("nobody read the status: %v\n%s", err, out)
	}
	// Refused by the peer check, not by the file system.
	if strings.Contains(out, "permission denied") {
		t.Fatalf("the socket's mode kept nobody out, the test did not reach the check: %s", out)
	}
}

// TestTargets: the client asks the newest live agent that is not
// stopping, every live one with all, the one of an instance file; a
// state dir no agent used is a clear error.
func TestTargets(t *testing.T) {
	dir := shortDir(t)
	if _, err := Targets(dir, "", false); err == nil || !strings.Contains(err.Error(), "no agent has run") {
		t.Fatalf("empty state dir: %v", err)
	}
	old, err := instance.Register(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	time.Sleep(time.Millisecond)
	newer, err := instance.Register(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer newer.Close()
	got, err := Targets(dir, "", false)
	if err != nil || len(got) != 1 || got[0].Instance != newer.Name() || got[0].Socket != SocketPath(dir, newer.Name()) {
		t.Fatalf("default target %+v %v, want the newer agent %s", got, err, newer.Name())
	}
	newer.Stopping()
	if got, _ := Targets(dir, "", false); len(got) != 1 || got[0].Instance != old.Name() {
		t.Fatalf("with the newer agent stopping: %+v, want the older", got)
	}
	if got, _ := Targets(dir, "", true); len(got) != 2 || got[0].Instance != old.Name() || !got[1].Stopping {
		t.Fatalf("all: %+v", got)
	}
	file := filepath.Join(dir, "inst")
	old.WriteName(file)
	if got, _ := Targets(dir, file, false); len(got) != 1 || got[0].Instance != old.Name() {
		t.Fatalf("instance file: %+v", got)
	}
	os.WriteFile(file, []byte("../../etc/passwd\n"), 0o600)
	if _, err := Targets(dir, file, false); err == nil {
		t.Fatal("an instance file naming a path was taken")
	}
}

// TestPrune removes the sockets of agents no longer alive only.
func TestPrune(t *testing.T) {
	dir := shortDir(t)
	os.MkdirAll(filepath.Join(dir, SocketDir), 0o700)
	for _, n := range []string{"live", "dead"} {
		os.WriteFile(SocketPath(dir, n), nil, 0o600)
	}
	Prune(dir, func(n string) bool { return n == "live" })
	if _, err := os.Stat(SocketPath(dir, "live")); err != nil {
		t.Fatal("live agent's socket removed")
	}
	if _, err := os.Stat(SocketPath(dir, "dead")); !os.IsNotExist(err) {
		t.Fatal("dead agent's socket kept")
	}
}

func TestMain(m *testing.M) {
	if path := os.Getenv("AMBIT_ADMIN_TEST_FETCH"); path != "" {
		// Child of runAsNobody.
		st, err := Fetch(context.Background(), path)
		if err != nil {
			fmt.Println(err)
			os.Exit(1)
		}
		json.NewEncoder(os.Stdout).Encode(st)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// runAsNobody runs a copy of this test binary as nobody (uid 65534),
// fetching the status from path, and returns what it printed.
func runAsNobody(t *testing.T, path string) (string, error) {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	dir := shortDir(t)
	os.Chmod(dir, 0o755)
	bin := filepath.Join(dir, "admin.test")
	if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), "AMBIT_ADMIN_TEST_FETCH="+path)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// TestRenderExpiredCertificate: the certs view's STATE says "expired" for
// a certificate past its end, not "ok" (nor only its failed fetches):
// an expired certificate fails every handshake of its pods.
func TestRenderExpiredCertificate(t *testing.T) {
	now := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	st := &Status{Version: Version, Agent: Agent{Now: now, Ready: true}, Certificates: []Certificate{
		{Identity: "spiffe://td/ns/a/sa/quiet", Serial: "1", NotAfter: now.Add(-time.Minute), Pods: 1},
		{Identity: "spiffe://td/ns/a/sa/failing", Serial: "2", NotAfter: now.Add(-time.Minute), Pods: 1, Failures: 3},
		{Identity: "spiffe://td/ns/a/sa/fine", Serial: "3", NotAfter: now.Add(time.Hour), Pods: 1},
	}}
	var b strings.Builder
	if err := Render(&b, st, ViewCerts); err != nil {
		t.Fatal(err)
	}
	states := map[string]string{}
	for _, line := range strings.Split(b.String(), "\n") {
		if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], "spiffe://") {
			states[f[0]] = strings.Join(f[7:], " ")
		}
	}
	for id, want := range map[string]string{"spiffe://td/ns/a/sa/quiet": "expired",
		"spiffe://td/ns/a/sa/failing": "expired, 3 failed fetches", "spiffe://td/ns/a/sa/fine": "ok"} {
		if states[id] != want {
			t.Errorf("%s: state %q, want %q\n%s", id, states[id], want, b.String())
		}
	}
}

// TestRenderCellsStayInTheirColumns: a tab or newline in a cell (a trust
// bundle root's subject is whatever its maker wrote) neither shifts the
// table's columns nor adds a line that reads as the agent's own.
func TestRenderCellsStayInTheirColumns(t *testing.T) {
	now := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	forged := "CN=root\n# forged\tx"
	st := &Status{Version: Version, Agent: Agent{Now: now, Ready: true},
		Pods:         []Pod{{Namespace: "a", Name: "p", State: StatePending, Reason: "No\nSandbox"}},
		Certificates: []Certificate{{Identity: "spiffe://td/ns/a/sa/s", Serial: "1", NotAfter: now.Add(time.Hour), Issuer: forged}},
		TrustBundle:  []CertRef{{Subject: forged, SHA256: "ab", NotAfter: now.Add(time.Hour)}}}
	for _, view := range []string{ViewPods, ViewCerts} {
		var b strings.Builder
		if err := Render(&b, st, view); err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(b.String(), "\n") {
			if strings.HasPrefix(line, "# forged") || strings.HasPrefix(line, "Sandbox") {
				t.Errorf("%s view: a cell's newline made a line of its own:\n%s", view, b.String())
			}
		}
	}
}
