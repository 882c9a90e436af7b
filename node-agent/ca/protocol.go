package ca

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"
)

// The agent↔CA wire protocol: HTTPS (TLS 1.3), JSON bodies.
//
//	POST /v1/certificates
//	  Authorization: Bearer <projected service-account token, audience "ambit-ca">
//	  {"csr": "<PEM CERTIFICATE REQUEST>", "ttlSeconds": 86400}
//	→ 200 {"chain": "<PEM leaf + intermediates>", "roots": "<PEM trust bundle>"}
//
//	GET /v1/roots            (no authentication)
//	→ 200 {"roots": "<PEM trust bundle>"}
//
// Errors: 400/401/403/405/413/429/500 with {"error": "...", "reason": "..."}.
// reason is a stable machine-readable word (see the Reason constants); error
// is for humans.
const (
	PathCertificates = "/v1/certificates"
	PathRoots        = "/v1/roots"
	// MaxRequestBytes bounds a request body.
	MaxRequestBytes = 64 << 10
	// DefaultAudience is the audience of the agent's projected token.
	DefaultAudience = "ambit-ca"
)

// CertificateRequest is the body of POST /v1/certificates.
type CertificateRequest struct {
	CSR string `json:"csr"`
	// TTLSeconds asks for a lifetime; 0 means the CA's default. The CA
	// clamps it to its maximum.
	TTLSeconds int64 `json:"ttlSeconds,omitempty"`
}

// CertificateResponse is the body of a successful POST /v1/certificates.
type CertificateResponse struct {
	Chain string `json:"chain"`
	Roots string `json:"roots"`
}

// RootsResponse is the body of GET /v1/roots.
type RootsResponse struct {
	Roots string `json:"roots"`
}

// ErrorResponse is the body of every refusal.
type ErrorResponse struct {
	Error  string `json:"error"`
	Reason Reason `json:"reason"`
}

// Reason says, in one stable word, why a request was refused. It is the
// label of the refusal counter.
type Reason string

const (
	ReasonBadRequest      Reason = "bad_request"
	ReasonUnauthenticated Reason = "unauthenticated"
	ReasonNotAgent        Reason = "not_agent"
	ReasonNoNode          Reason = "no_node"
	ReasonNotOnNode       Reason = "not_on_node"
	ReasonRateLimited     Reason = "rate_limited"
	ReasonInternal        Reason = "internal"
)

// DecodeCertificateRequest parses and validates a request body: exactly one
// JSON object with known fields, a CSR, a ttl that is not negative. The CSR
// itself is checked by ParseCSR.
func DecodeCertificateRequest(body []byte) (CertificateRequest, time.Duration, error) {
	var req CertificateRequest
	if len(body) > MaxRequestBytes {
		return req, 0, fmt.Errorf("request body of %d bytes, more than %d", len(body), MaxRequestBytes)
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return CertificateRequest{}, 0, fmt.Errorf("request body: %v", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return CertificateRequest{}, 0, errors.New("request body: trailing data after the JSON object")
	}
	if req.CSR == "" {
		return CertificateRequest{}, 0, errors.New("request body: csr is required")
	}
	if req.TTLSeconds < 0 || req.TTLSeconds > int64(365*24*time.Hour/time.Second) {
		return CertificateRequest{}, 0, fmt.Errorf("request body: ttlSeconds %d out of range", req.TTLSeconds)
	}
	return req, time.Duration(req.TTLSeconds) * time.Second, nil
}
