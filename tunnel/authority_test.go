package tunnel_test

import (
	"testing"

	"github.com/ambit-mesh/ambit/tunnel"
)

func TestParseAuthority(t *testing.T) {
	for in, ok := range map[string]bool{
		"10.0.0.1:8080": true, "[fd00::1]:80": true, "[::ffff:10.0.0.1]:80": true,
		"10.0.0.1": false, "10.0.0.1:0": false, "example.com:80": false, "[fe80::1%eth0]:80": false,
		"": false, "10.0.0.1:99999": false, ":80": false,
	} {
		ap, err := tunnel.ParseAuthority(in)
		if (err == nil) != ok {
			t.Errorf("ParseAuthority(%q) = %v, %v; want ok=%v", in, ap, err, ok)
		}
		if err == nil && ap.Addr().Is4In6() {
			t.Errorf("ParseAuthority(%q) kept a v4-mapped address", in)
		}
	}
}

// FuzzParseAuthority: never panics; what it accepts round-trips.
func FuzzParseAuthority(f *testing.F) {
	for _, s := range []string{"10.0.0.1:8080", "[fd00::1]:80", "x:1", "[::1%lo]:1", "1.2.3.4:65535"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ap, err := tunnel.ParseAuthority(s)
		if err != nil {
			return
		}
		if ap.Port() == 0 || !ap.Addr().IsValid() {
			t.Fatalf("accepted %q as %v", s, ap)
		}
		back, err := tunnel.ParseAuthority(ap.String())
		if err != nil || back != ap {
			t.Fatalf("%q → %v does not round-trip: %v %v", s, ap, back, err)
		}
	})
}
