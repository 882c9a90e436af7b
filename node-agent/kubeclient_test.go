package main

import (
	"os"
	"path/filepath"
	"testing"

	"k8s.io/client-go/kubernetes"
)

// TestKubeClientRate: the agent's Kubernetes client takes the configured
// rate, by default a burst of 100 requests without waiting (each pod
// started costs a status annotation write). With client-go's default
// (5/s, burst 10) the 11th request of a burst waits, and the 50th pod of
// 50 started at once was annotated 8 s after its ADD.
func TestKubeClientRate(t *testing.T) {
	dir := t.TempDir()
	kc := filepath.Join(dir, "kubeconfig")
	// Never dialled: building a client does not connect.
	os.WriteFile(kc, []byte(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
`), 0o600)
	cfgFile := filepath.Join(dir, "agent.yaml")
	os.WriteFile(cfgFile, []byte("nodeName: n1\nkubeconfig: "+kc+"\n"), 0o600)

	burst := func(o overrides) int {
		t.Helper()
		cfg, err := loadConfig(o)
		if err != nil {
			t.Fatal(err)
		}
		rc, err := kubeRESTConfig(cfg)
		if err != nil {
			t.Fatal(err)
		}
		c, err := kubernetes.NewForConfig(rc)
		if err != nil {
			t.Fatal(err)
		}
		rl := c.CoreV1().RESTClient().GetRateLimiter()
		if rl == nil {
			t.Fatal("no rate limiter")
		}
		n := 0
		for n < 1000 && rl.TryAccept() {
			n++
		}
		return n
	}
	// A token or two may refill while the loop runs.
	if n := burst(overrides{path: cfgFile}); n < 100 || n > 102 {
		t.Fatalf("default config: %d requests in a burst, want 100", n)
	}
	if n := burst(overrides{path: cfgFile, kubeAPIQPS: 1, kubeAPIBurst: 7}); n != 7 {
		t.Fatalf("--kube-api-qps 1 --kube-api-burst 7: %d requests in a burst", n)
	}
}
