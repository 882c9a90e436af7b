package main

import (
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// The README's first command must keep working: run the demo binary as a
// newcomer would and hold it to every check it prints.
func TestDemo(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	for _, name := range []string{"ambit-cni", "ambit-agent"} {
		copyFile(t, testenv.Binary(t, name), filepath.Join(dir, name))
	}
	demo := filepath.Join(dir, "ambit-demo")
	b := exec.Command("go", "build", "-trimpath", "-o", demo, ".")
	if out, err := b.CombinedOutput(); err != nil {
		t.Fatalf("building the demo: %v\n%s", err, out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, demo).CombinedOutput()
	t.Logf("demo output:\n%s", out)
	if err != nil {
		t.Fatalf("the demo failed: %v", err)
	}
	for _, want := range []string{
		"the server saw the client's own pod IP",
		"accepted it over HBONE mTLS from spiffe://cluster.local/ns/shop/sa/client",
		"passthrough works",
		"refused",
		"ns/shop/sa/intruder", // the status table's row
		"the agent reports 3 pods enrolled, each as its own service account",
		"only TLS to port 15008 between the pods",
		"appears nowhere in the capture",
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("demo output lacks %q", want)
		}
	}
	if strings.Contains(string(out), "✘") {
		t.Error("the demo reported a failed check")
	}
	if out, _ := exec.Command("ip", "netns", "list").Output(); strings.Contains(string(out), "ambit-demo-node") {
		t.Error("the demo left its node namespace behind")
	}
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	out.Close()
}
