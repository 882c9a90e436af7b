package tunnel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// soOriginalDst is SO_ORIGINAL_DST (IPv4) and IP6T_SO_ORIGINAL_DST (IPv6):
// the destination a connection had before REDIRECT rewrote it.
const soOriginalDst = 80

// originalDst reads the pre-NAT destination of a redirected connection.
func originalDst(c *net.TCPConn) (netip.AddrPort, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	local, _ := netip.ParseAddrPort(c.LocalAddr().String())
	order := []int{unix.SOL_IPV6, unix.SOL_IP}
	if local.Addr().Unmap().Is4() {
		order = []int{unix.SOL_IP, unix.SOL_IPV6}
	}
	var out netip.AddrPort
	var lastErr error
	cerr := rc.Control(func(fd uintptr) {
		for _, level := range order {
			var b [28]byte // sockaddr_in6, the larger of the two
			l := uint32(len(b))
			_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, uintptr(level), soOriginalDst,
				uintptr(unsafe.Pointer(&b[0])), uintptr(unsafe.Pointer(&l)), 0)
			if e != 0 {
				lastErr = e
				continue
			}
			ap, err := parseSockaddr(b[:l])
			if err != nil {
				lastErr = err
				continue
			}
			out = ap
			return
		}
	})
	if cerr != nil {
		return netip.AddrPort{}, cerr
	}
	if !out.IsValid() {
		return netip.AddrPort{}, fmt.Errorf("original destination: %w", lastErr)
	}
	return out, nil
}

func parseSockaddr(b []byte) (netip.AddrPort, error) {
	if len(b) < 8 {
		return netip.AddrPort{}, errors.New("short sockaddr")
	}
	fam := *(*uint16)(unsafe.Pointer(&b[0]))
	port := binary.BigEndian.Uint16(b[2:4])
	switch fam {
	case unix.AF_INET:
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[4:8])), port), nil
	case unix.AF_INET6:
		if len(b) < 24 {
			return netip.AddrPort{}, errors.New("short sockaddr_in6")
		}
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[8:24])).Unmap(), port), nil
	}
	return netip.AddrPort{}, fmt.Errorf("sockaddr family %d", fam)
}

// ParseAuthority parses a CONNECT :authority of the form ip:port (IPv6
// in brackets). HBONE addresses pods by IP, so host names are refused.
func ParseAuthority(s string) (netip.AddrPort, error) {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("authority %q is not ip:port: %w", s, err)
	}
	if ap.Port() == 0 {
		return netip.AddrPort{}, fmt.Errorf("authority %q: port 0", s)
	}
	if ap.Addr().Zone() != "" {
		return netip.AddrPort{}, fmt.Errorf("authority %q: zones not allowed", s)
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
}
