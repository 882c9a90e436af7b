package cniproto

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"testing"

	"github.com/ambit-mesh/ambit/plugin/redirectspec"
)

// FuzzAppendRequest: the hand-written encoding is json.Marshal's, byte
// for byte, whatever the field values (escapes, invalid UTF-8, U+2028,
// empty and invalid prefixes, optional fields and lists).
func FuzzAppendRequest(f *testing.F) {
	f.Add(1, "add", "mesh", "web-0", "u1", "ctr-1", "/var/run/netns/x", "eth0", []byte{10, 9, 0, 5, 24}, "keep-1", "eth0", uint8(1), "", "k8s-pod-network")
	f.Add(0, "gc", "", "", "", "", "", "", []byte(nil), "c\u2028<&>\"\\\x01\xff", "", uint8(3), "iptables-nft", "")
	f.Add(-7, "x\ty", "ns\n", "n\u2029", "", "\x7f", "", "e", []byte{0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 200}, "", "", uint8(0), "n\u2028<", "net\x00<b>\xff")
	f.Fuzz(func(t *testing.T, version int, op, ns, name, uid, cid, netns, ifname string, ips []byte, vcid, vif string, nvalid uint8, backend, network string) {
		r := &Request{Version: version, Op: Op(op), Pod: Pod{Namespace: ns, Name: name, UID: uid, ContainerID: cid, Netns: netns, IfName: ifname}, RuleBackend: redirectspec.Backend(backend), Network: network}
		// ips: chunks of 4+1 bytes (IPv4/bits), or 16+1 after a 0xfd
		// marker; a 0 byte adds the zero Prefix.
		for len(ips) > 0 && len(r.Pod.IPs) < 20 {
			switch {
			case ips[0] == 0:
				r.Pod.IPs, ips = append(r.Pod.IPs, netip.Prefix{}), ips[1:]
			case ips[0] == 0xfd && len(ips) >= 18:
				a := netip.AddrFrom16([16]byte(ips[1:17]))
				r.Pod.IPs, ips = append(r.Pod.IPs, netip.PrefixFrom(a, int(ips[17])-60)), ips[18:]
			case len(ips) >= 5:
				a := netip.AddrFrom4([4]byte(ips[:4]))
				r.Pod.IPs, ips = append(r.Pod.IPs, netip.PrefixFrom(a, int(ips[4])-60)), ips[5:]
			default:
				ips = nil
			}
		}
		switch nvalid % 4 {
		case 1:
			r.Valid = []Attachment{}
		case 2, 3:
			for i := 0; i < int(nvalid%4); i++ {
				r.Valid = append(r.Valid, Attachment{ContainerID: vcid, IfName: vif})
			}
		}
		want, err := json.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		if got := appendRequest(nil, r); !bytes.Equal(got, want) {
			t.Fatalf("appendRequest:\n got %s\nwant %s", got, want)
		}
	})
}
