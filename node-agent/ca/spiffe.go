package ca

import (
	"errors"
	"fmt"
	"net/url"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation"
)

// ID is a workload identity, spiffe://<TrustDomain>/ns/<Namespace>/sa/<ServiceAccount>.
type ID struct {
	TrustDomain    string
	Namespace      string
	ServiceAccount string
}

// String renders the SPIFFE ID.
func (id ID) String() string {
	return "spiffe://" + id.TrustDomain + "/ns/" + id.Namespace + "/sa/" + id.ServiceAccount
}

// URL renders the SPIFFE ID as the URI SAN of a certificate.
func (id ID) URL() *url.URL {
	return &url.URL{Scheme: "spiffe", Host: id.TrustDomain, Path: "/ns/" + id.Namespace + "/sa/" + id.ServiceAccount}
}

// NewID builds and validates an identity.
func NewID(trustDomain, namespace, serviceAccount string) (ID, error) {
	id := ID{TrustDomain: trustDomain, Namespace: namespace, ServiceAccount: serviceAccount}
	return id, id.validate()
}

// ParseID parses a SPIFFE ID of the Kubernetes form ns/X/sa/Y. Anything else
// (other schemes, query, fragment, user info, port, extra path segments,
// names Kubernetes would not accept) is an error.
func ParseID(s string) (ID, error) {
	if len(s) > 2048 {
		return ID{}, errors.New("spiffe id longer than 2048 bytes")
	}
	if !strings.HasPrefix(s, "spiffe://") {
		return ID{}, fmt.Errorf("spiffe id %q: scheme must be spiffe://", s)
	}
	u, err := url.Parse(s)
	if err != nil {
		return ID{}, fmt.Errorf("spiffe id %q: %v", s, err)
	}
	id, err := idFromURL(u)
	if err != nil {
		return ID{}, err
	}
	// net/url drops an empty fragment ("…/sa/web#") without a trace in
	// the URL, and the SPIFFE spec forbids fragments: what is accepted
	// must be exactly the ID it names.
	if id.String() != s {
		return ID{}, fmt.Errorf("spiffe id %q: only spiffe://<trust-domain>/ns/<ns>/sa/<sa> is accepted", s)
	}
	return id, nil
}

func idFromURL(u *url.URL) (ID, error) {
	if u.Scheme != "spiffe" || u.Opaque != "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" || u.Port() != "" || u.ForceQuery {
		return ID{}, fmt.Errorf("spiffe id %q: only spiffe://<trust-domain>/ns/<ns>/sa/<sa> is accepted", u.String())
	}
	if u.RawPath != "" && u.RawPath != u.Path {
		return ID{}, fmt.Errorf("spiffe id %q: escaped path not allowed", u.String())
	}
	parts := strings.Split(u.Path, "/")
	if len(parts) != 5 || parts[0] != "" || parts[1] != "ns" || parts[3] != "sa" {
		return ID{}, fmt.Errorf("spiffe id %q: path must be /ns/<namespace>/sa/<serviceaccount>", u.String())
	}
	id := ID{TrustDomain: u.Host, Namespace: parts[2], ServiceAccount: parts[4]}
	return id, id.validate()
}

func (id ID) validate() error {
	if err := ValidateTrustDomain(id.TrustDomain); err != nil {
		return err
	}
	if errs := validation.IsDNS1123Label(id.Namespace); len(errs) > 0 {
		return fmt.Errorf("spiffe id: namespace %q: %s", id.Namespace, strings.Join(errs, "; "))
	}
	if errs := validation.IsDNS1123Subdomain(id.ServiceAccount); len(errs) > 0 {
		return fmt.Errorf("spiffe id: service account %q: %s", id.ServiceAccount, strings.Join(errs, "; "))
	}
	return nil
}

// ValidateTrustDomain accepts what the SPIFFE spec allows in a trust domain
// name: lowercase letters, digits, '.', '-', '_', at most 255 bytes.
func ValidateTrustDomain(td string) error {
	if td == "" || len(td) > 255 {
		return fmt.Errorf("trust domain %q: must be 1..255 bytes", td)
	}
	for _, c := range td {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '.' || c == '-' || c == '_') {
			return fmt.Errorf("trust domain %q: only [a-z0-9._-] allowed", td)
		}
	}
	return nil
}
