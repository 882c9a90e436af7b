package hostrules

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

const (
	nftDefaultTable = "ambit-host"
	nftChain        = "postrouting"
	nftSetV4        = "probes-v4"
	nftSetV6        = "probes-v6"
	// One below srcnat (100): the probe SNAT is decided before
	// kube-proxy's or a CNI's masquerade chains registered at srcnat.
	nftPriority = 99
)

// nftBackend keeps the rules in one inet table, replaced in one netlink
// transaction.
type nftBackend struct {
	cfg   Config
	table *nftables.Table
	c     *nftables.Conn // lasting; guarded by Manager.mu
}

func newNFT(cfg Config) (*nftBackend, error) {
	name := cfg.Name
	if name == "" {
		name = nftDefaultTable
	}
	if len(name) > 255 {
		return nil, fmt.Errorf("hostrules: nft table name %q too long", name)
	}
	return &nftBackend{cfg: cfg, table: &nftables.Table{Family: nftables.TableFamilyINet, Name: name}}, nil
}

func (b *nftBackend) name() string { return BackendNFTables }

// conn returns the backend's lasting netlink connection, dialing it on
// first use: dialing into another namespace costs a thread switch, which
// dominated single-entry updates. A failed operation drops it (reset) so
// the next one starts on a fresh socket.
func (b *nftBackend) conn() (*nftables.Conn, error) {
	if b.c != nil {
		return b.c, nil
	}
	opts := []nftables.ConnOption{nftables.AsLasting(), nftables.WithSockOptions(bigSendBuffer)}
	if b.cfg.NetNS > 0 {
		opts = append(opts, nftables.WithNetNSFd(int(b.cfg.NetNS)))
	}
	c, err := nftables.New(opts...)
	if err != nil {
		return nil, err
	}
	b.c = c
	return c, nil
}

// nftSendBuffer is the send buffer of the writing connection. A
// transaction goes out in one sendmsg, which the kernel refuses beyond the
// socket's send buffer (default ~208 KiB: EMSGSIZE at about 3000 dual-stack
// entries); 4 MiB (doubled by the kernel) holds some 120000 entries, as
// nft(8) forces its own.
const nftSendBuffer = 4 << 20

// nftRecvBuffer is the receive buffer of the writing connection. The
// kernel queues one acknowledgement per message of a transaction, all at
// once after the commit, and drops the rest when they overflow the
// buffer: the default (~208 KiB, ~260 acks, ~50000 entries at
// nftElemsPerMsg) failed a committed write with ENOBUFS. 4 MiB holds the
// acks of the largest transaction nftSendBuffer lets through.
const nftRecvBuffer = 4 << 20

// bigSendBuffer raises c's send and receive buffers past
// net.core.wmem_max/rmem_max (SO_SNDBUFFORCE, SO_RCVBUFFORCE,
// CAP_NET_ADMIN, which the agent has for nftables anyway). Failing, the
// connection keeps its defaults: enough for all but the largest nodes,
// where the write's error will say so.
func bigSendBuffer(c *netlink.Conn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil
	}
	rc.Control(func(fd uintptr) {
		_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, nftSendBuffer)
		_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, nftRecvBuffer)
	})
	return nil
}

// done passes err through, dropping the connection when it failed.
func (b *nftBackend) done(err error) error {
	if err != nil && b.c != nil {
		b.c.CloseLasting()
		b.c = nil
	}
	return err
}

// dial is a short-lived connection for callers outside Manager.mu.
func dial(cfg Config) (*nftables.Conn, error) {
	if cfg.NetNS > 0 {
		return nftables.New(nftables.WithNetNSFd(int(cfg.NetNS)))
	}
	return nftables.New()
}

// nftAvailable reports whether the kernel answers nftables over netlink.
func nftAvailable(cfg Config) bool {
	c, err := dial(cfg)
	if err != nil {
		return false
	}
	_, err = c.ListTablesOfFamily(nftables.TableFamilyINet)
	return err == nil
}

func (b *nftBackend) sets() (v4, v6 *nftables.Set) {
	v4 = &nftables.Set{Table: b.table, Name: nftSetV4, KeyType: nftables.TypeIPAddr, Comment: "enrolled pod IPs (element comment: pod UID)"}
	v6 = &nftables.Set{Table: b.table, Name: nftSetV6, KeyType: nftables.TypeIP6Addr, Comment: "enrolled pod IPs (element comment: pod UID)"}
	return v4, v6
}

func (b *nftBackend) chain() *nftables.Chain {
	prio := nftables.ChainPriority(nftPriority)
	policy := nftables.ChainPolicyAccept
	return &nftables.Chain{
		Name: nftChain, Table: b.table, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: &prio, Policy: &policy,
	}
}

func ruleTag(v6 bool) []byte {
	s := "ambit: kubelet probes to enrolled pods, v4"
	if v6 {
		s = "ambit: kubelet probes to enrolled pods, v6"
	}
	return userdata.AppendString(nil, userdata.TypeComment, s)
}

// rule builds, for one family:
//
//	meta nfproto <fam> meta l4proto tcp <ip|ip6> daddr @set
//	meta skuid >= 0 (or == KubeletUID) counter snat <ip|ip6> to <probe source>
func (b *nftBackend) rule(set *nftables.Set, v6 bool) *nftables.Rule {
	proto, off, ln, src := byte(unix.NFPROTO_IPV4), uint32(16), uint32(4), b.cfg.ProbeSNATv4
	if v6 {
		proto, off, ln, src = unix.NFPROTO_IPV6, 24, 16, b.cfg.ProbeSNATv6
	}
	owner := expr.Any(&expr.Cmp{Op: expr.CmpOpGte, Register: 1, Data: []byte{0, 0, 0, 0}})
	if b.cfg.KubeletUID != nil {
		owner = &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(*b.cfg.KubeletUID)}
	}
	return &nftables.Rule{
		Table: b.table, Chain: b.chain(), UserData: ruleTag(v6),
		Exprs: []expr.Any{
			&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: ln},
			&expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID},
			// Loading skuid stops the rule for packets without a full
			// local socket (forwarded traffic): --socket-exists.
			&expr.Meta{Key: expr.MetaKeySKUID, Register: 1},
			owner,
			&expr.Counter{},
			&expr.Immediate{Register: 1, Data: src.AsSlice()},
			&expr.NAT{Type: expr.NATTypeSourceNAT, Family: uint32(proto), RegAddrMin: 1},
		},
	}
}

func split(want map[netip.Addr]string) (v4, v6 []nftables.SetElement) {
	for ip, uid := range want {
		e := nftables.SetElement{Key: ip.AsSlice(), Comment: uid}
		if ip.Is4() {
			v4 = append(v4, e)
		} else {
			v6 = append(v6, e)
		}
	}
	return v4, v6
}

func (b *nftBackend) check(_ context.Context, want map[netip.Addr]string) (string, error) {
	// A fresh connection for the dumps: on the lasting one, multi-part
	// set element dumps came back short now and then (google/nftables
	// v0.3.0), which would count phantom repairs.
	c, err := dial(b.cfg)
	if err != nil {
		return "", err
	}
	if _, err := c.ListTableOfFamily(b.table.Name, b.table.Family); err != nil {
		return "table missing", nil // missing (someone ran "nft flush ruleset")
	}
	ch, err := c.ListChain(b.table, nftChain)
	if err != nil || ch.Hooknum == nil || *ch.Hooknum != *nftables.ChainHookPostrouting || ch.Type != nftables.ChainTypeNAT {
		return "chain missing or not a nat postrouting chain", nil
	}
	rules, err := c.GetRules(b.table, ch)
	if err != nil {
		return "", err
	}
	v4set, v6set := b.sets()
	wantRules := []*nftables.Rule{b.rule(v4set, false), b.rule(v6set, true)}
	setNames := []string{nftSetV4, nftSetV6}
	if b.cfg.IPv4Only {
		wantRules, setNames = wantRules[:1], setNames[:1]
	}
	if len(rules) != len(wantRules) {
		return fmt.Sprintf("%d rules in the chain, want %d", len(rules), len(wantRules)), nil
	}
	for i, r := range rules {
		if !bytes.Equal(r.UserData, wantRules[i].UserData) || len(r.Exprs) != len(wantRules[i].Exprs) {
			return fmt.Sprintf("rule %d is not ours", i), nil
		}
	}
	got := map[netip.Addr]string{}
	for _, name := range setNames {
		s, err := c.GetSetByName(b.table, name)
		if err != nil {
			return "set " + name + " missing", nil
		}
		elems, err := c.GetSetElements(s)
		if err != nil {
			return "", err
		}
		for _, e := range elems {
			ip, ok := netip.AddrFromSlice(e.Key)
			if !ok {
				return "set element with a bad key", nil
			}
			got[ip] = e.Comment
		}
	}
	if len(got) != len(want) {
		return fmt.Sprintf("%d set elements, want %d", len(got), len(want)), nil
	}
	for ip, uid := range want {
		if got[ip] != uid {
			return fmt.Sprintf("set element %s owned by %q, want %q", ip, got[ip], uid), nil
		}
	}
	return "", nil
}

func (b *nftBackend) write(_ context.Context, want map[netip.Addr]string) error {
	c, err := b.conn()
	if err != nil {
		return err
	}
	// add + delete + add in one transaction: replaces the table whether
	// or not it existed, with no moment where the rule is missing.
	c.AddTable(b.table)
	c.DelTable(b.table)
	c.AddTable(b.table)
	v4set, v6set := b.sets()
	e4, e6 := split(want)
	if err := addSet(c, v4set, e4); err != nil {
		return b.done(err)
	}
	if !b.cfg.IPv4Only {
		if err := addSet(c, v6set, e6); err != nil {
			return b.done(err)
		}
	}
	c.AddChain(b.chain())
	c.AddRule(b.rule(v4set, false))
	if !b.cfg.IPv4Only {
		c.AddRule(b.rule(v6set, true))
	}
	return b.done(c.Flush())
}

// nftElemsPerMsg bounds the elements of one netlink message. The library
// nests a message's whole element list in one attribute, whose length is
// 16 bits: past ~1090 IPv4 entries (65535 bytes) it wrapped, and the
// kernel took a truncated list (or refused the batch, ENOBUFS), so a node
// with that many pod IPs lost the probe SNAT of the rest and "repaired"
// it every interval. 200 elements stay under the bound even with
// 255-byte comments.
const nftElemsPerMsg = 200

// addSet adds s with elems to c's batch, the elements in as many messages
// as nftElemsPerMsg needs; they all commit in the same transaction.
func addSet(c *nftables.Conn, s *nftables.Set, elems []nftables.SetElement) error {
	if err := c.AddSet(s, nil); err != nil {
		return err
	}
	for len(elems) > 0 {
		n := min(len(elems), nftElemsPerMsg)
		if err := c.SetAddElements(s, elems[:n]); err != nil {
			return err
		}
		elems = elems[n:]
	}
	return nil
}

func (b *nftBackend) upsert(add map[netip.Addr]string, replaced map[netip.Addr]bool) error {
	c, err := b.conn()
	if err != nil {
		return err
	}
	v4set, v6set := b.sets()
	for ip, uid := range add {
		s := v4set
		if ip.Is6() {
			s = v6set
		}
		// An element's comment cannot be changed in place: re-add it.
		// Added first, so the delete cannot fail on an element another
		// agent already removed (see remove).
		if replaced[ip] {
			e := []nftables.SetElement{{Key: ip.AsSlice()}}
			if err := c.SetAddElements(s, e); err != nil {
				return b.done(err)
			}
			if err := c.SetDeleteElements(s, e); err != nil {
				return b.done(err)
			}
		}
		if err := c.SetAddElements(s, []nftables.SetElement{{Key: ip.AsSlice(), Comment: uid}}); err != nil {
			return b.done(err)
		}
	}
	return b.done(c.Flush())
}

func (b *nftBackend) remove(ips []netip.Addr) error {
	c, err := b.conn()
	if err != nil {
		return err
	}
	v4set, v6set := b.sets()
	for _, ip := range ips {
		s := v4set
		if ip.Is6() {
			s = v6set
		}
		// Add, then delete, in one transaction: the element is gone
		// whether or not it was there. During a surge upgrade both
		// agents release a deleted pod, and the second delete alone
		// failed (ENOENT), which sent its Manager to a full rewrite
		// from its own picture: a repair counted, and the old agent's
		// rewrite dropped the entries of pods only the new one knows.
		// (An add without NLM_F_EXCL accepts an existing element. The
		// ipset backend's delete of a missing entry already succeeds:
		// its entries carry Replace, so no NLM_F_EXCL.)
		e := []nftables.SetElement{{Key: ip.AsSlice()}}
		if err := c.SetAddElements(s, e); err != nil {
			return b.done(err)
		}
		if err := c.SetDeleteElements(s, e); err != nil {
			return b.done(err)
		}
	}
	return b.done(c.Flush())
}

func (b *nftBackend) uninstall() error {
	c, err := b.conn()
	if err != nil {
		return err
	}
	c.AddTable(b.table)
	c.DelTable(b.table)
	err = b.done(c.Flush())
	if b.c != nil {
		b.c.CloseLasting()
		b.c = nil
	}
	return err
}

// watch subscribes to nftables change notifications and calls kick when
// something of ours may have been deleted, so a flush is repaired at once
// instead of at the next interval. Element deletions carry no table name
// in the notification, so every one kicks; Run coalesces kicks.
func (b *nftBackend) watch(ctx context.Context, kick func()) error {
	c, err := dial(b.cfg)
	if err != nil {
		return err
	}
	// Action/object "any": the library's filter for narrower flags drops
	// messages it should keep; we filter below.
	mon := nftables.NewMonitor(nftables.WithMonitorAction(nftables.MonitorActionAny),
		nftables.WithMonitorObject(nftables.MonitorObjectAny), nftables.WithMonitorEventBuffer(64))
	events, err := c.AddGenerationalMonitor(mon)
	if err != nil {
		return err
	}
	go func() {
		<-ctx.Done()
		mon.Close()
	}()
	go func() {
		for evs := range events {
			for _, ev := range evs.Changes {
				if b.ours(ev) {
					kick()
					break
				}
			}
		}
	}()
	return nil
}

func (b *nftBackend) ours(ev *nftables.MonitorEvent) bool {
	if ev.Error != nil {
		return ev.Type == nftables.MonitorEventTypeOOB
	}
	var t *nftables.Table
	switch ev.Type {
	case nftables.MonitorEventTypeDelTable:
		t, _ = ev.Data.(*nftables.Table)
	case nftables.MonitorEventTypeDelChain:
		if c, ok := ev.Data.(*nftables.Chain); ok {
			t = c.Table
		}
	case nftables.MonitorEventTypeDelRule:
		if r, ok := ev.Data.(*nftables.Rule); ok {
			t = r.Table
		}
	case nftables.MonitorEventTypeDelSet:
		if s, ok := ev.Data.(*nftables.Set); ok {
			t = s.Table
		}
	case nftables.MonitorEventTypeDelSetElem:
		return true
	default:
		return false
	}
	return t != nil && t.Name == b.table.Name
}
