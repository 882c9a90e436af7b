package identity

import (
	"context"
	"crypto/x509"
	"fmt"
	"time"

	"github.com/ambit-mesh/ambit/node-agent/ca"
)

// Signer turns a CSR into a certificate chain. The manager does not care
// whether the CA is remote (HTTPS, Kubernetes mode) or in-process (static
// mode): both implement this.
type Signer interface {
	// Sign returns the chain (leaf first, then intermediates) and the
	// current trust bundle.
	Sign(ctx context.Context, csrDER []byte, ttl time.Duration) (chain, roots []*x509.Certificate, err error)
	// Roots returns the current trust bundle.
	Roots(ctx context.Context) ([]*x509.Certificate, error)
}

// LocalSigner signs in-process with a file-backed (or any) Authority. It
// trusts its caller: in static mode the agent is the only party, and it
// only asks for identities of the workloads of its own inventory.
type LocalSigner struct{ Authority *ca.Authority }

// NewLocalSigner opens (or creates on first start) the local CA in dir.
func NewLocalSigner(dir, trustDomain string) (*LocalSigner, error) {
	a, err := ca.LoadOrCreateLocal(dir, trustDomain)
	if err != nil {
		return nil, err
	}
	return &LocalSigner{Authority: a}, nil
}

func (l *LocalSigner) Sign(_ context.Context, csrDER []byte, ttl time.Duration) ([]*x509.Certificate, []*x509.Certificate, error) {
	csr, id, err := ca.ParseCSRDER(csrDER, l.Authority.TrustDomain())
	if err != nil {
		return nil, nil, err
	}
	chain, _, err := l.Authority.Sign(csr, id, ttl)
	if err != nil {
		return nil, nil, err
	}
	return chain, l.Authority.Material().Roots, nil
}

func (l *LocalSigner) Roots(context.Context) ([]*x509.Certificate, error) {
	r := l.Authority.Material().Roots
	if len(r) == 0 {
		return nil, fmt.Errorf("local ca: empty trust bundle")
	}
	return r, nil
}
