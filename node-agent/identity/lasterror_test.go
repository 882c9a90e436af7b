package identity_test

import (
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/ca/catest"
	"github.com/ambit-mesh/ambit/node-agent/identity"
)

// TestLastErrorBounded: a proxy in front of the CA answers 502 with a
// 600 KB HTML error page (the agent reads up to 1 MiB of a refusal).
// What the Manager reports for `ambit-agent status certs` is the
// refusal on one line, at most identity.MaxLastError bytes and marked
// cut, not the page: before, LastError carried the whole body, newlines
// and all, into every status answer.
func TestLastErrorBounded(t *testing.T) {
	a := newAuthority(t)
	page := "<html>\r\n<head><title>502 Bad Gateway</title></head>\n<body>\n" + strings.Repeat("<p>upstream connect error ü</p>\n", 20000) + "</body></html>\n"
	proxy := catest.StartServer(t, a, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html")
		w.WriteHeader(http.StatusBadGateway)
		w.Write([]byte(page))
	}))
	m := startManager(t, identity.Config{TrustDomain: td, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Remote: &identity.RemoteConfig{URL: proxy.URL, ServerName: proxy.ServerName,
			Token: func() (string, error) { return "token", nil }, Roots: a.Material().Roots}})
	if err := m.Prefetch(webID); err != nil {
		t.Fatal(err)
	}
	var got string
	waitFor(t, 10*time.Second, "the fetch failed", func() bool {
		for _, c := range m.Certificates() {
			if c.Identity == webID && c.Failures > 0 {
				got = c.LastError
				return true
			}
		}
		return false
	})
	t.Logf("LastError (%d bytes): %s", len(got), got)
	if !strings.Contains(got, "CA refused (502") || !strings.Contains(got, "502 Bad Gateway") {
		t.Errorf("LastError does not say what happened: %q", got)
	}
	if len(got) > identity.MaxLastError+len("…") || !strings.HasSuffix(got, "…") {
		t.Errorf("LastError is %d bytes (want at most %d, marked cut with …)", len(got), identity.MaxLastError)
	}
	if strings.ContainsAny(got, "\r\n\t") || strings.Contains(got, "  ") || !utf8.ValidString(got) {
		t.Errorf("LastError is not one clean line of whole characters: %q", got)
	}
}

// TestFetchFailureLogBounded: the same 600 KB error page must not become
// a 600 KB warning line on every failed fetch (the log goes to the
// node's journal and the cluster's log pipeline). Before, the refusal
// carried the whole body: one warning line of ~660,000 bytes.
func TestFetchFailureLogBounded(t *testing.T) {
	a := newAuthority(t)
	page := "<html>\n<head><title>502 Bad Gateway</title></head>\n" + strings.Repeat("<p>upstream connect error</p>\n", 20000) + "</html>\n"
	proxy := catest.StartServer(t, a, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusBadGateway)
		w.Write([]byte(page))
	}))
	var logs testenv.Buffer
	m := startManager(t, identity.Config{TrustDomain: td, Logger: slog.New(slog.NewTextHandler(&logs, nil)),
		Remote: &identity.RemoteConfig{URL: proxy.URL, ServerName: proxy.ServerName,
			Token: func() (string, error) { return "token", nil }, Roots: a.Material().Roots}})
	if err := m.Prefetch(webID); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the failed fetch logged", func() bool {
		return strings.Contains(logs.String(), "workload certificate fetch failed")
	})
	for _, l := range strings.Split(logs.String(), "\n") {
		if strings.Contains(l, "fetch failed") {
			if !strings.Contains(l, "502 Bad Gateway") {
				t.Errorf("the warning does not say what happened: %.300q", l)
			}
			if len(l) > 2048 {
				t.Errorf("the warning is %d bytes; want the refusal, not the page (at most 2 KiB)", len(l))
			}
		}
	}
}
