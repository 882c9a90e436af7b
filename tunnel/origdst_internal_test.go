package tunnel

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

// sockaddr lays out what SO_ORIGINAL_DST writes: family in host order,
// port in network order, then the address (sin_addr at 4, sin6_addr at
// 8 after sin6_flowinfo), in a buffer of size n (the kernel leaves the
// length the caller passed, 28, also for a sockaddr_in).
func sockaddr(fam uint16, ap netip.AddrPort, n int) []byte {
	b := make([]byte, n)
	binary.NativeEndian.PutUint16(b[0:2], fam)
	binary.BigEndian.PutUint16(b[2:4], ap.Port())
	if fam == unix.AF_INET {
		a := ap.Addr().As4()
		copy(b[4:8], a[:])
	} else {
		a := ap.Addr().As16()
		copy(b[8:24], a[:])
	}
	return b
}

// The original destination is looked up as a Service address and a pod
// IP, both stored unmapped: a v4-mapped IPv6 destination (an app's
// AF_INET6 socket connecting to ::ffff:<clusterIP>) must come out as the
// IPv4 address, or the Service is missed and the connection passed
// through in plaintext.
func TestParseSockaddr(t *testing.T) {
	for _, c := range []struct {
		name string
		b    []byte
		want string // "" for an error
	}{
		{"v4, 16 bytes", sockaddr(unix.AF_INET, netip.MustParseAddrPort("10.96.0.10:80"), 16), "10.96.0.10:80"},
		{"v4, 28 bytes", sockaddr(unix.AF_INET, netip.MustParseAddrPort("10.96.0.10:80"), 28), "10.96.0.10:80"},
		{"v6", sockaddr(unix.AF_INET6, netip.MustParseAddrPort("[fd00::10]:8443"), 28), "[fd00::10]:8443"},
		{"v4-mapped v6", sockaddr(unix.AF_INET6, netip.MustParseAddrPort("[::ffff:10.96.0.10]:80"), 28), "10.96.0.10:80"},
		{"short", make([]byte, 7), ""},
		{"short v6", sockaddr(unix.AF_INET6, netip.MustParseAddrPort("[fd00::10]:80"), 28)[:23], ""},
		{"unknown family", sockaddr(unix.AF_UNIX, netip.MustParseAddrPort("10.0.0.1:80"), 28), ""},
	} {
		got, err := parseSockaddr(c.b)
		if c.want == "" {
			if err == nil {
				t.Errorf("%s: got %v, want an error", c.name, got)
			}
			continue
		}
		if err != nil || got != netip.MustParseAddrPort(c.want) {
			t.Errorf("%s: got %v, %v; want %s", c.name, got, err, c.want)
		}
	}
}
