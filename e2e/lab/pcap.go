package lab

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"syscall"
	"time"
)

// Capture is a running tcpdump on one interface of a namespace, written to
// a pcap file. We only read the file back, never trust tcpdump's text.
type Capture struct {
	File string
	cmd  *exec.Cmd
}

// StartCapture captures every packet on iface inside the namespace at
// netnsPath ("" = our own) — full packets, unbuffered — until Stop.
func StartCapture(netnsPath, iface, file string) (*Capture, error) {
	argv := []string{"tcpdump", "-i", iface, "-s", "0", "-U", "--immediate-mode", "-n", "-w", file}
	if netnsPath != "" {
		argv = append([]string{"nsenter", "--net=" + netnsPath, "--"}, argv...)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	// tcpdump writes the file header once it is listening.
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if st, err := os.Stat(file); err == nil && st.Size() >= 24 {
			time.Sleep(100 * time.Millisecond)
			return &Capture{File: file, cmd: cmd}, nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	cmd.Process.Kill()
	cmd.Wait()
	return nil, fmt.Errorf("tcpdump on %s did not start: %s", iface, bytes.TrimSpace(stderr.Bytes()))
}

// Stop ends the capture and waits for the file to be complete.
func (c *Capture) Stop() error {
	time.Sleep(200 * time.Millisecond) // let the last packets reach the file
	c.cmd.Process.Signal(syscall.SIGINT)
	done := make(chan error, 1)
	go func() { done <- c.cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		c.cmd.Process.Kill()
		<-done
	}
	return nil
}

// Packet is one captured TCP segment (IPv4 or IPv6 over Ethernet).
type Packet struct {
	Src, Dst netip.AddrPort
	Payload  []byte
}

// ReadPCAP parses a classic pcap file of Ethernet frames and returns its
// TCP segments; other frames are skipped.
func ReadPCAP(file string) ([]Packet, []byte, error) {
	raw, err := os.ReadFile(file)
	if err != nil {
		return nil, nil, err
	}
	if len(raw) < 24 {
		return nil, raw, fmt.Errorf("pcap %s: truncated header", file)
	}
	var bo binary.ByteOrder
	switch binary.LittleEndian.Uint32(raw) {
	case 0xa1b2c3d4, 0xa1b23c4d:
		bo = binary.LittleEndian
	default:
		bo = binary.BigEndian
	}
	if lt := bo.Uint32(raw[20:]); lt != 1 {
		return nil, raw, fmt.Errorf("pcap %s: link type %d, want Ethernet", file, lt)
	}
	var out []Packet
	for off := 24; off+16 <= len(raw); {
		incl := int(bo.Uint32(raw[off+8:]))
		off += 16
		if off+incl > len(raw) {
			break
		}
		if p, ok := parseEthernetTCP(raw[off : off+incl]); ok {
			out = append(out, p)
		}
		off += incl
	}
	return out, raw, nil
}

func parseEthernetTCP(f []byte) (Packet, bool) {
	if len(f) < 14 {
		return Packet{}, false
	}
	et := binary.BigEndian.Uint16(f[12:])
	b := f[14:]
	var src, dst netip.Addr
	var l4 []byte
	switch et {
	case 0x0800:
		if len(b) < 20 || b[9] != 6 {
			return Packet{}, false
		}
		ihl := int(b[0]&0x0f) * 4
		tot := int(binary.BigEndian.Uint16(b[2:]))
		if ihl < 20 || tot > len(b) || tot < ihl {
			return Packet{}, false
		}
		src, _ = netip.AddrFromSlice(b[12:16])
		dst, _ = netip.AddrFromSlice(b[16:20])
		l4 = b[ihl:tot]
	case 0x86dd:
		if len(b) < 40 || b[6] != 6 {
			return Packet{}, false
		}
		pl := int(binary.BigEndian.Uint16(b[4:]))
		if 40+pl > len(b) {
			return Packet{}, false
		}
		src, _ = netip.AddrFromSlice(b[8:24])
		dst, _ = netip.AddrFromSlice(b[24:40])
		l4 = b[40 : 40+pl]
	default:
		return Packet{}, false
	}
	if len(l4) < 20 {
		return Packet{}, false
	}
	doff := int(l4[12]>>4) * 4
	if doff < 20 || doff > len(l4) {
		return Packet{}, false
	}
	return Packet{
		Src:     netip.AddrPortFrom(src, binary.BigEndian.Uint16(l4[0:])),
		Dst:     netip.AddrPortFrom(dst, binary.BigEndian.Uint16(l4[2:])),
		Payload: l4[doff:],
	}, true
}

// WireReport summarises what a capture saw between two sets of pods.
type WireReport struct {
	Segments       int
	PayloadBytes   int
	PortsSeen      map[uint16]int // server-side port → payload bytes
	PlaintextFound bool           // the secret appeared in the raw capture
}

// Analyze reports the TCP traffic between any address in a and any in b,
// and whether secret appears anywhere in the capture file's bytes.
func Analyze(file string, a, b []netip.Addr, secret []byte) (WireReport, error) {
	pkts, raw, err := ReadPCAP(file)
	if err != nil {
		return WireReport{}, err
	}
	in := func(x netip.Addr, set []netip.Addr) bool {
		for _, s := range set {
			if s == x {
				return true
			}
		}
		return false
	}
	r := WireReport{PortsSeen: map[uint16]int{}}
	// Per-direction byte streams, so a secret split across segments is
	// still found.
	flows := map[[2]netip.AddrPort][]byte{}
	for _, p := range pkts {
		k := [2]netip.AddrPort{p.Src, p.Dst}
		flows[k] = append(flows[k], p.Payload...)
		s, d := p.Src.Addr(), p.Dst.Addr()
		var port uint16
		switch {
		case in(s, a) && in(d, b):
			port = p.Dst.Port()
		case in(s, b) && in(d, a):
			port = p.Src.Port()
		default:
			continue
		}
		r.Segments++
		r.PayloadBytes += len(p.Payload)
		r.PortsSeen[port] += len(p.Payload)
	}
	if len(secret) > 0 {
		r.PlaintextFound = bytes.Contains(raw, secret)
		for _, f := range flows {
			r.PlaintextFound = r.PlaintextFound || bytes.Contains(f, secret)
		}
	}
	return r, nil
}
