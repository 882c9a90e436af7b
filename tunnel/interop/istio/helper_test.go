package istio

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	istiohbone "istio.io/istio/pkg/hbone"
	istiolog "istio.io/istio/pkg/log"

	"github.com/ambit-mesh/ambit/internal/testca"
	"github.com/ambit-mesh/ambit/tunnel/internal/benchkit"
	"github.com/ambit-mesh/ambit/tunnel/internal/podtest"
)

// The Istio side runs as a child process inside a pod's netns (ip netns
// exec <ns> <this test binary>): Istio's HBONE dials with the default Go
// dialer from whatever goroutine, so the whole process has to live in the
// pod's namespace, like an agent would.
//
// Roles (AMBIT_ISTIO_ROLE):
//
//	server  Istio hbone.NewServer on :15008 with mTLS
//	dial    Istio hbone dialer: CONNECT $TARGET via $PROXY, send $SEND,
//	        half-close, print the answer
//	relay   for each port in $PORTS: listen on 17000+port, CONNECT
//	        $TARGET_IP:port via $PROXY, pipe (the bench baseline)
func TestMain(m *testing.M) {
	benchkit.MaybeHelper()
	switch os.Getenv("AMBIT_ISTIO_ROLE") {
	case "":
		os.Exit(m.Run())
	case "server":
		helperServer()
	case "dial":
		helperDial()
	case "relay":
		helperRelay()
	}
	os.Exit(0)
}

func quiet() {
	for _, s := range istiolog.Scopes() {
		s.SetOutputLevel(istiolog.ErrorLevel)
	}
}

func helperTLS() *tls.Config {
	cert, err := tls.LoadX509KeyPair(os.Getenv("CERT"), os.Getenv("KEY"))
	if err != nil {
		fail(err)
	}
	roots := x509.NewCertPool()
	b, _ := os.ReadFile(os.Getenv("ROOT"))
	roots.AppendCertsFromPEM(b)
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		NextProtos:   []string{"h2"},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    roots,
		// SPIFFE certs have no DNS names: chain-check only.
		InsecureSkipVerify: true,
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "helper:", err)
	os.Exit(2)
}

func helperServer() {
	quiet()
	srv := istiohbone.NewServer()
	srv.Protocols.SetHTTP2(true)
	srv.TLSConfig = helperTLS()
	ln, err := net.Listen("tcp", ":15008")
	if err != nil {
		fail(err)
	}
	fmt.Println("ready")
	go func() { io.Copy(io.Discard, os.Stdin); os.Exit(0) }() // die with the test
	if err := srv.ServeTLS(ln, "", ""); err != nil && err != http.ErrServerClosed {
		fail(err)
	}
}

func dialer() istiohbone.Dialer {
	return istiohbone.NewDialer(istiohbone.Config{ProxyAddress: os.Getenv("PROXY"), TLS: helperTLS()})
}

func helperDial() {
	quiet()
	c, err := dialer().DialContext(context.Background(), "tcp", os.Getenv("TARGET"))
	if err != nil {
		fail(err)
	}
	io.WriteString(c, os.Getenv("SEND"))
	// net.Pipe has no half-close: read the answer (the app closes).
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	b, _ := io.ReadAll(c)
	fmt.Print(string(b))
}

func helperRelay() {
	quiet()
	d := dialer()
	target := os.Getenv("TARGET_IP")
	for _, p := range strings.Fields(os.Getenv("PORTS")) {
		ln, err := net.Listen("tcp", "127.0.0.1:"+fmt.Sprint(17000+atoi(p)))
		if err != nil {
			fail(err)
		}
		go func(port string) {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					u, err := d.DialContext(context.Background(), "tcp", net.JoinHostPort(target, port))
					if err != nil {
						return
					}
					defer u.Close()
					pipeHalf(c, u)
				}()
			}
		}(p)
	}
	fmt.Println("ready")
	io.Copy(io.Discard, os.Stdin)
}

// pipeHalf copies both ways; the Istio side is a net.Pipe (no
// half-close), so a FIN from the app closes the pipe's write side by
// closing it once the answer came back.
func pipeHalf(app net.Conn, up net.Conn) {
	done := make(chan struct{})
	go func() {
		io.Copy(app, up)
		app.(*net.TCPConn).CloseWrite()
		close(done)
	}()
	io.Copy(up, app)
	<-done
}

func atoi(s string) int {
	n := 0
	for _, c := range s {
		n = n*10 + int(c-'0')
	}
	return n
}

// writePEM writes a certificate, key and root as files for a helper.
func writePEM(t testing.TB, ca *testca.CA, id string) []string {
	t.Helper()
	c, err := ca.Issue(id, testca.IssueOptions{})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	keyDER, err := x509.MarshalPKCS8PrivateKey(c.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{
		"cert.pem": pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Certificate[0]}),
		"key.pem":  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
		"root.pem": pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Cert.Raw}),
	}
	for n, b := range files {
		if err := os.WriteFile(filepath.Join(dir, n), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return []string{"CERT=" + filepath.Join(dir, "cert.pem"), "KEY=" + filepath.Join(dir, "key.pem"), "ROOT=" + filepath.Join(dir, "root.pem")}
}

// helper starts this binary in pod p's netns with a role. wait: a line
// "ready" is awaited on stdout. The process dies with the test (stdin).
func helper(t testing.TB, p *podtest.Pod, wait bool, env ...string) (*exec.Cmd, *strings.Builder) {
	t.Helper()
	self, _ := os.Executable()
	cmd := exec.Command("ip", "netns", "exec", p.Name, self)
	cmd.Env = append(os.Environ(), env...)
	out := &strings.Builder{}
	stdin, _ := cmd.StdinPipe()
	t.Cleanup(func() { stdin.Close(); cmd.Process.Kill(); cmd.Wait() })
	if !wait {
		cmd.Stdout = out
		cmd.Stderr = out
		return cmd, out
	}
	stdout, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 6)
	if _, err := io.ReadFull(stdout, buf); err != nil || string(buf) != "ready\n" {
		t.Fatalf("helper did not start: %q %v", buf, err)
	}
	return cmd, out
}
