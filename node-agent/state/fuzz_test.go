package state

import (
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// FuzzPutList: a record the store accepts comes back from List exactly
// as it was put. Losing one at restart is silent (List removes records
// that do not match their file name), and the pod it describes is then
// never re-adopted, so Put must refuse anything it cannot give back.
func FuzzPutList(f *testing.F) {
	f.Add("shop", "web-0", "u-1", "0123abcd", "/var/run/netns/cni-1", uint64(4026532000), []byte{10, 244, 1, 5}, "spiffe://cluster.local/ns/shop/sa/web", "nftables", uint8(0b1111), int64(1767225600e9), "eth0", "k8s-pod-network,net-b")
	f.Add("", "", "", "c/../weird id", "", uint64(0), []byte(nil), "", "", uint8(0), int64(0), "", "")
	f.Add("a", "b", "", "\xff\xfe", "", uint64(0), []byte{0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1}, "", "", uint8(2), int64(-1), "net1", ",net-b")
	f.Add("a\u2028", "b", "", "c\x00d", "\n", uint64(1), []byte{1, 2, 3}, "", "iptables", uint8(5), int64(1), "e\xff", "n\xff,\u2028<&>")
	f.Fuzz(func(t *testing.T, ns, name, uid, cid, netns string, inode uint64, ips []byte, identity, backend string, flags uint8, since int64, ifName, networks string) {
		p := Pod{Namespace: ns, Name: name, UID: uid, ContainerID: cid, Netns: netns, NetnsInode: inode,
			Identity: identity, Backend: backend, IfName: ifName,
			Enrolled: flags&1 != 0, IPv4: flags&2 != 0, IPv6: flags&4 != 0, MigrateReq: flags&8 != 0,
			Since: time.Unix(0, since).UTC()}
		// networks: comma-separated, "" kept as the own attachment's
		// unknown network; none at all is nil, as the agent writes it.
		if networks != "" {
			p.Networks = strings.Split(networks, ",")
		}
		// ips: 4-byte chunks, or 16 after a 0xfd marker.
		for len(ips) >= 4 && len(p.IPs) < 8 {
			if ips[0] == 0xfd && len(ips) >= 17 {
				p.IPs, ips = append(p.IPs, netip.AddrFrom16([16]byte(ips[1:17]))), ips[17:]
				continue
			}
			p.IPs, ips = append(p.IPs, netip.AddrFrom4([4]byte(ips[:4]))), ips[4:]
		}
		s, err := Open(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Put(p); err != nil {
			return
		}
		got, errs := s.List()
		if len(errs) != 0 || len(got) != 1 {
			t.Fatalf("put %+v, listed %+v, errors %v", p, got, errs)
		}
		if !got[0].Since.Equal(p.Since) {
			t.Fatalf("since %v came back as %v", p.Since, got[0].Since)
		}
		got[0].Since = p.Since
		if !reflect.DeepEqual(got[0], p) {
			t.Fatalf("put  %+v\nlist %+v", p, got[0])
		}
		if err := s.Delete(cid); err != nil {
			t.Fatal(err)
		}
		if got, errs := s.List(); len(got) != 0 || len(errs) != 0 {
			t.Fatalf("after delete: %+v %v", got, errs)
		}
	})
}

// FuzzListRecord: whatever a record file holds (a torn write, a hand
// edit, a record of another agent version), List returns it as a record
// that belongs to its file name, or reports it; never a panic. A JSON
// object it reports is left in place (maybe another version's), anything
// else it reports is removed.
func FuzzListRecord(f *testing.F) {
	f.Add([]byte(`{"namespace":"a","name":"p","containerID":"c1","ips":["10.0.0.1"],"enrolled":true,"since":"2026-01-01T00:00:00Z"}`), "c1", false)
	f.Add([]byte(`{"containerID":"c1","ips":["10.0.0.1%eth0"]}`), "c1", false)
	f.Add([]byte(`{"containerID":"c2"}`), "c1", false)
	f.Add([]byte(`{"containerID":"","since":"x"}`), "", true)
	f.Add([]byte(`{not json`), "c1", false)
	f.Add([]byte(`null`), "c1", false)
	f.Fuzz(func(t *testing.T, b []byte, cid string, odd bool) {
		s, err := Open(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		name := Key(cid) + ".json"
		if odd {
			name = "0123.json" // a name no container ID hashes to
		}
		path := filepath.Join(s.Dir(), name)
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		got, errs := s.List()
		switch {
		case len(got) == 1 && len(errs) == 0:
			if got[0].ContainerID == "" || Key(got[0].ContainerID)+".json" != name {
				t.Fatalf("listed %+v from %s", got[0], name)
			}
		case len(got) == 0 && len(errs) == 1:
			var obj map[string]json.RawMessage
			isObject := json.Unmarshal(b, &obj) == nil && obj != nil
			_, err := os.Stat(path)
			if isObject && err != nil {
				t.Fatalf("a JSON object %s removed (%v): %v", name, errs[0], err)
			}
			if !isObject && !os.IsNotExist(err) {
				t.Fatalf("bad record %s kept: %v", name, errs[0])
			}
		default:
			t.Fatalf("one file listed as %+v, %v", got, errs)
		}
	})
}
