package hbone

import (
	"errors"
	"fmt"
	"strings"

	"golang.org/x/net/http2/hpack"
)

// Request is a decoded request header block.
type Request struct {
	Method    string
	Authority string
	Scheme    string
	Path      string
	Protocol  string
	// Header holds the regular (non-pseudo) fields in order.
	Header []hpack.HeaderField
}

// Get returns the first value of a (lowercase) header, "" if absent.
func (r *Request) Get(name string) string {
	for _, f := range r.Header {
		if f.Name == name {
			return f.Value
		}
	}
	return ""
}

// parseRequest checks a request header block the way RFC 9113 §8.3 and
// §8.5 require and extracts it. A malformed block is a stream error.
func parseRequest(fields []hpack.HeaderField) (*Request, error) {
	r := &Request{}
	seen := map[string]bool{}
	regular := false
	for _, f := range fields {
		if strings.HasPrefix(f.Name, ":") {
			if regular {
				return nil, errors.New("pseudo-header after a regular header")
			}
			if seen[f.Name] {
				return nil, fmt.Errorf("duplicate pseudo-header %s", f.Name)
			}
			seen[f.Name] = true
			switch f.Name {
			case ":method":
				r.Method = f.Value
			case ":authority":
				r.Authority = f.Value
			case ":scheme":
				r.Scheme = f.Value
			case ":path":
				r.Path = f.Value
			case ":protocol":
				r.Protocol = f.Value
			default:
				return nil, fmt.Errorf("unknown pseudo-header %q", f.Name)
			}
			continue
		}
		regular = true
		if !validFieldName(f.Name) {
			return nil, fmt.Errorf("invalid header name %q", f.Name)
		}
		if !validFieldValue(f.Value) {
			return nil, fmt.Errorf("invalid value for header %q", f.Name)
		}
		switch f.Name {
		case "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade":
			return nil, fmt.Errorf("connection-specific header %q", f.Name)
		case "te":
			if f.Value != "trailers" {
				return nil, errors.New(`te header other than "trailers"`)
			}
		}
		r.Header = append(r.Header, f)
	}
	if r.Method == "" {
		return nil, errors.New("missing :method")
	}
	if r.Method == "CONNECT" && r.Protocol == "" {
		if r.Authority == "" {
			return nil, errors.New("CONNECT without :authority")
		}
		if seen[":scheme"] || seen[":path"] {
			return nil, errors.New("CONNECT with :scheme or :path")
		}
	} else if r.Protocol != "" && r.Method != "CONNECT" {
		return nil, errors.New(":protocol on a non-CONNECT request")
	}
	return r, nil
}

// validFieldName: lowercase token characters only (RFC 9113 §8.2.1).
func validFieldName(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0:
		default:
			return false
		}
	}
	return true
}

// validFieldValue: no NUL, CR or LF, no leading/trailing whitespace.
func validFieldValue(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c == 0 || c == '\r' || c == '\n' {
			return false
		}
	}
	if s != "" && (s[0] == ' ' || s[0] == '\t' || s[len(s)-1] == ' ' || s[len(s)-1] == '\t') {
		return false
	}
	return true
}
