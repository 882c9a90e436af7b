package tunnel

import (
	"context"
	"errors"
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"
)

// Config wires a Proxy to its surroundings.
type Config struct {
	Directory    Directory
	Certificates Certificates
	Authorizer   Authorizer
	Logger       *slog.Logger
	// Registerer receives the tunnel's metrics; nil means none.
	Registerer prometheus.Registerer
}

// Proxy serves any number of pods.
type Proxy struct{ cfg Config }

// New validates cfg and returns a Proxy.
func New(cfg Config) (*Proxy, error) {
	if cfg.Directory == nil || cfg.Certificates == nil {
		return nil, errors.New("tunnel: Directory and Certificates are required")
	}
	return &Proxy{cfg: cfg}, nil
}

// Serving is one pod being served.
type Serving struct{}

// Serve starts accepting on pod's listeners. (Placeholder until the data
// path lands: refuses.)
func (p *Proxy) Serve(pod Pod) (*Serving, error) {
	return nil, errors.New("tunnel: not implemented yet")
}

// Close stops accepting (closes the pod's listeners), lets established
// connections finish until ctx ends, then cuts what remains.
func (s *Serving) Close(ctx context.Context) error { return nil }

// Reauthorize checks every live inbound connection again with the
// Authorizer and closes those no longer allowed.
func (p *Proxy) Reauthorize() {}
