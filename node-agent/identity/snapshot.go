package identity

import (
	"crypto/x509"
	"slices"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// CertState is what the Manager holds for one workload identity, for an
// operator's view (ambit-agent status). It carries the public certificate
// only: the private key never leaves the Manager.
type CertState struct {
	Identity string
	// Leaf is the current certificate; nil before the first fetch
	// succeeded. Shared: do not modify it.
	Leaf *x509.Certificate
	// Chain are the certificates sent after the leaf (intermediates).
	Chain []*x509.Certificate
	// Pods is how many enrolled pods pin the identity (0: fetched on
	// demand only).
	Pods int
	// NextFetch is when rotation (or the next retry) is due.
	NextFetch time.Time
	// Fetching: a fetch is running now.
	Fetching bool
	// Failures counts the fetches failed in a row, LastError the last
	// one's error (one line, at most MaxLastError bytes) and LastFailure
	// when it failed.
	Failures    int
	LastError   string
	LastFailure time.Time
}

// Certificates lists the identities the Manager holds, sorted. Read under
// the Manager's lock; the certificates are not copied (they are never
// modified once issued).
func (m *Manager) Certificates() []CertState {
	m.mu.Lock()
	out := make([]CertState, 0, len(m.entries))
	chains := make([][][]byte, 0, len(m.entries))
	for _, e := range m.entries {
		s := CertState{Identity: e.id, Pods: e.refs, NextFetch: e.due, Fetching: e.inflight != nil,
			Failures: e.failures, LastFailure: e.lastFail}
		if e.lastErr != nil {
			s.LastError = brief(e.lastErr.Error(), MaxLastError)
		}
		var chain [][]byte
		if e.cert != nil {
			s.Leaf = e.cert.Leaf
			chain = e.cert.Certificate[min(1, len(e.cert.Certificate)):]
		}
		out = append(out, s)
		chains = append(chains, chain)
	}
	m.mu.Unlock()
	// Parsed outside the lock, which every handshake's Certificate takes.
	for i, chain := range chains {
		for _, der := range chain {
			if c, err := x509.ParseCertificate(der); err == nil {
				out[i].Chain = append(out[i].Chain, c)
			}
		}
	}
	slices.SortFunc(out, func(a, b CertState) int { return strings.Compare(a.Identity, b.Identity) })
	return out
}

// MaxLastError bounds CertState.LastError: a CA's or a proxy's refusal
// carries its body (up to 1 MiB read, identity/remote.go), which an
// error page of a load balancer fills with HTML; status shows what
// happened, not the page.
const MaxLastError = 512

// brief is s on one line (each run of white space and control
// characters one space) and at most max bytes, cut at a character's
// boundary and marked "…" when cut.
func brief(s string, max int) string {
	var b strings.Builder
	b.Grow(min(len(s), max))
	space := false
	for _, r := range strings.TrimSpace(s) {
		if unicode.IsSpace(r) || unicode.IsControl(r) {
			space = true
			continue
		}
		if space {
			space = false
			if b.Len()+1 > max {
				return b.String() + "…"
			}
			b.WriteByte(' ')
		}
		if b.Len()+utf8.RuneLen(r) > max {
			return b.String() + "…"
		}
		b.WriteRune(r)
	}
	return b.String()
}
