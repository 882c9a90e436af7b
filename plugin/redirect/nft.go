package redirect

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"reflect"
	"strings"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// TableName is the one inet table the nftables backend owns in a pod
// netns. Nothing else of ours lives in nftables, so removal is "delete
// this table" and never touches anyone else's rules.
const TableName = "ambit"

// userdataPrefix marks our rules; the rest of the userdata is the rule's
// nft text, which Verify compares.
const userdataPrefix = "ambit:"

type nftChain struct {
	name     string
	typ      nftables.ChainType
	hook     *nftables.ChainHook
	priority *nftables.ChainPriority
}

var nftChains = map[hook]nftChain{
	mangleIn: {"mangle-prerouting", nftables.ChainTypeFilter, nftables.ChainHookPrerouting, nftables.ChainPriorityMangle},
	// A route chain: a mark set here makes the kernel re-route the
	// packet, which is what sends the app's replies to the agent.
	mangleOut: {"mangle-output", nftables.ChainTypeRoute, nftables.ChainHookOutput, nftables.ChainPriorityMangle},
	natIn:     {"nat-prerouting", nftables.ChainTypeNAT, nftables.ChainHookPrerouting, nftables.ChainPriorityNATDest},
	natOut:    {"nat-output", nftables.ChainTypeNAT, nftables.ChainHookOutput, nftables.ChainPriorityNATDest},
	filterOut: {"filter-output", nftables.ChainTypeFilter, nftables.ChainHookOutput, nftables.ChainPriorityFilter},
}

func hookName(h *nftables.ChainHook) string {
	switch *h {
	case *nftables.ChainHookPrerouting:
		return "prerouting"
	case *nftables.ChainHookOutput:
		return "output"
	}
	return fmt.Sprint(*h)
}

// nftRule is one rule in both forms: text for humans, golden files and
// verification, and expressions for the kernel.
type nftRule struct {
	text  string
	exprs []expr.Any
}

func buildNftRule(r rule) nftRule {
	var text []string
	var ex []expr.Any
	proto := byte(unix.NFPROTO_IPV4)
	ipw := "ip"
	if r.fam == 6 {
		proto, ipw = unix.NFPROTO_IPV6, "ip6"
	}
	// In an inet table every rule first pins its family, so address
	// offsets are meaningful and a v4-only spec never touches v6.
	text = append(text, "meta nfproto "+map[family]string{4: "ipv4", 6: "ipv6"}[r.fam])
	ex = append(ex,
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}})
	for _, c := range r.conds {
		op, ops := expr.CmpOpEq, "=="
		if c.neg {
			op, ops = expr.CmpOpNeq, "!="
		}
		switch c.kind {
		case condTCP:
			text = append(text, "meta l4proto tcp")
			ex = append(ex,
				&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}})
		case condSaddr, condDaddr:
			dir, off := "saddr", uint32(12)
			if c.kind == condDaddr {
				dir, off = "daddr", 16
			}
			if r.fam == 6 {
				off = map[condKind]uint32{condSaddr: 8, condDaddr: 24}[c.kind]
			}
			addr := c.prefix.Addr().AsSlice()
			ex = append(ex, &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: uint32(len(addr))})
			if c.prefix.Bits() != len(addr)*8 {
				mask := prefixMask(c.prefix.Bits(), len(addr))
				ex = append(ex, &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: uint32(len(addr)), Mask: mask, Xor: make([]byte, len(addr))})
				text = append(text, fmt.Sprintf("%s %s %s %s", ipw, dir, ops, c.prefix))
			} else {
				text = append(text, fmt.Sprintf("%s %s %s %s", ipw, dir, ops, c.prefix.Addr()))
			}
			ex = append(ex, &expr.Cmp{Op: op, Register: 1, Data: addr})
		case condDport:
			text = append(text, fmt.Sprintf("tcp dport %s %d", ops, c.port))
			ex = append(ex,
				&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
				&expr.Cmp{Op: op, Register: 1, Data: binaryutil.BigEndian.PutUint16(c.port)})
		case condMark, condCtMark:
			what := "meta mark"
			var load expr.Any = &expr.Meta{Key: expr.MetaKeyMARK, Register: 1}
			if c.kind == condCtMark {
				what = "ct mark"
				load = &expr.Ct{Key: expr.CtKeyMARK, Register: 1}
			}
			text = append(text, fmt.Sprintf("%s & %#x %s %#x", what, c.mask, ops, c.value))
			ex = append(ex, load,
				&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: binaryutil.NativeEndian.PutUint32(c.mask), Xor: binaryutil.NativeEndian.PutUint32(0)},
				&expr.Cmp{Op: op, Register: 1, Data: binaryutil.NativeEndian.PutUint32(c.value)})
		case condOifLo:
			text = append(text, fmt.Sprintf(`oifname %s"lo"`, map[bool]string{false: "", true: "!= "}[c.neg]))
			ex = append(ex,
				&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
				&expr.Cmp{Op: op, Register: 1, Data: ifname("lo")})
		case condCtNew:
			text = append(text, fmt.Sprintf("ct state %snew", map[bool]string{false: "", true: "!= "}[c.neg]))
			stateOp := expr.CmpOpNeq // the NEW bit is set
			if c.neg {
				stateOp = expr.CmpOpEq
			}
			ex = append(ex,
				&expr.Ct{Key: expr.CtKeySTATE, Register: 1},
				&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitNEW), Xor: binaryutil.NativeEndian.PutUint32(0)},
				&expr.Cmp{Op: stateOp, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)})
		}
	}
	switch r.act.kind {
	case actAccept:
		text = append(text, "accept")
		ex = append(ex, &expr.Verdict{Kind: expr.VerdictAccept})
	case actRedirect:
		text = append(text, fmt.Sprintf("redirect to :%d", r.act.port))
		ex = append(ex,
			&expr.Immediate{Register: 1, Data: binaryutil.BigEndian.PutUint16(r.act.port)},
			&expr.Redir{RegisterProtoMin: 1, RegisterProtoMax: 1, Flags: unix.NF_NAT_RANGE_PROTO_SPECIFIED})
	case actSetCtMark:
		text = append(text, fmt.Sprintf("ct mark set ct mark & %#x | %#x", ^r.act.mask, r.act.value))
		ex = append(ex,
			&expr.Ct{Key: expr.CtKeyMARK, Register: 1},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: binaryutil.NativeEndian.PutUint32(^r.act.mask), Xor: binaryutil.NativeEndian.PutUint32(r.act.value)},
			&expr.Ct{Key: expr.CtKeyMARK, Register: 1, SourceRegister: true})
	case actRestoreMark:
		text = append(text, "meta mark set ct mark")
		ex = append(ex,
			&expr.Ct{Key: expr.CtKeyMARK, Register: 1},
			&expr.Meta{Key: expr.MetaKeyMARK, Register: 1, SourceRegister: true})
	case actReject:
		text = append(text, "reject with tcp reset")
		ex = append(ex, &expr.Reject{Type: unix.NFT_REJECT_TCP_RST})
	}
	return nftRule{text: strings.Join(text, " "), exprs: ex}
}

func prefixMask(bits, n int) []byte {
	m := make([]byte, n)
	for i := 0; i < bits; i++ {
		m[i/8] |= 0x80 >> (i % 8)
	}
	return m
}

func ifname(n string) []byte {
	b := make([]byte, 16)
	copy(b, n)
	return b
}

// nftRulesByHook groups spec's rules per chain, in order.
func nftRulesByHook(s Spec) map[hook][]nftRule {
	m := map[hook][]nftRule{}
	for _, r := range ruleSet(s) {
		m[r.hook] = append(m[r.hook], buildNftRule(r))
	}
	return m
}

func renderNft(s Spec) string {
	var b strings.Builder
	rules := nftRulesByHook(s)
	fmt.Fprintf(&b, "table inet %s {\n", TableName)
	for _, h := range hooksOf(s) {
		c := nftChains[h]
		fmt.Fprintf(&b, "\tchain %s {\n\t\ttype %s hook %s priority %d; policy accept;\n", c.name, c.typ, hookName(c.hook), *c.priority)
		for _, r := range rules[h] {
			fmt.Fprintf(&b, "\t\t%s\n", r.text)
		}
		b.WriteString("\t}\n")
	}
	b.WriteString("}\n")
	return b.String()
}

// session is one exported call's view of a pod netns. Its nf_tables
// operations share one lasting netlink socket, dialled on first use:
// otherwise every list and every batch dials its own (a goroutine and two
// setns to enter the netns, and a freshly seeded math/rand source inside
// the netlink library), which is a measurable part of a CNI ADD.
// A session is used by one goroutine and closed by its creator.
//
// ctx bounds the session's iptables runs; the netlink operations are not
// cancellable, but none of them waits on anything host-wide.
type session struct {
	ctx   context.Context
	netns ns.NetNS
	nft   *nftables.Conn
	// budget, while an install works, ends each iptables run early
	// enough for the install's rollback (installBudget); nil otherwise.
	budget *installBudget
}

func newSession(ctx context.Context, netns ns.NetNS) *session {
	return &session{ctx: ctx, netns: netns}
}

func (s *session) conn() (*nftables.Conn, error) {
	if s.nft != nil {
		return s.nft, nil
	}
	c, err := nftables.New(nftables.WithNetNSFd(int(s.netns.Fd())), nftables.AsLasting())
	if err != nil {
		return nil, fmt.Errorf("opening nftables netlink socket in %s: %w", s.netns.Path(), err)
	}
	s.nft = c
	return c, nil
}

// reset drops the socket after a failed operation, so no unread answer
// of it can be mistaken for the next operation's.
func (s *session) reset() {
	if s.nft != nil {
		s.nft.CloseLasting()
		s.nft = nil
	}
}

func (s *session) close() { s.reset() }

// failed is reset for the error paths: it returns err unchanged.
func (s *session) failed(err error) error {
	if err != nil {
		s.reset()
	}
	return err
}

// nftAvailable reports whether the kernel answers nf_tables requests in
// netns.
func nftAvailable(s *session) error {
	c, err := s.conn()
	if err != nil {
		return err
	}
	if _, err := c.ListTablesOfFamily(nftables.TableFamilyINet); err != nil {
		return s.failed(fmt.Errorf("kernel does not answer nf_tables requests: %w", err))
	}
	return nil
}

// nftInstall replaces our table in one netlink batch: "add table" (a no-op
// when it exists), "delete table", then the full new table. The kernel
// applies the batch as one transaction, so the pod sees either the old
// rules or the new ones, never a mix or nothing.
func nftInstall(ss *session, s Spec) error {
	c, err := ss.conn()
	if err != nil {
		return err
	}
	t := &nftables.Table{Name: TableName, Family: nftables.TableFamilyINet}
	c.AddTable(t)
	c.DelTable(t)
	c.AddTable(t)
	rules := nftRulesByHook(s)
	for _, h := range hooksOf(s) {
		d := nftChains[h]
		ch := c.AddChain(&nftables.Chain{Name: d.name, Table: t, Type: d.typ, Hooknum: d.hook, Priority: d.priority})
		for _, r := range rules[h] {
			c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: r.exprs, UserData: []byte(userdataPrefix + r.text)})
		}
	}
	if err := c.Flush(); err != nil {
		return ss.failed(fmt.Errorf("nftables transaction replacing table inet %s: %w", TableName, err))
	}
	return nil
}

// nftPresent reports whether our table exists in netns.
func nftPresent(c *nftables.Conn) (bool, error) {
	t, err := nftTable(c)
	return t != nil, err
}

// nftTable returns our table as listed (nil when absent).
func nftTable(c *nftables.Conn) (*nftables.Table, error) {
	ts, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, err
	}
	for _, t := range ts {
		if t.Name == TableName {
			return t, nil
		}
	}
	return nil, nil
}

// Table flags (linux/netfilter/nf_tables.h).
const (
	nftTableDormant = 0x1 // hooks unregistered: the rules see no packet
	nftTableOwner   = 0x2 // removed when its creator's socket closes
)

// nftTableFlags returns t's flags as the kernel sent them. The library
// (google/nftables v0.3.0) decodes NFTA_TABLE_FLAGS in host byte order
// although, like every nf_tables attribute, it is big-endian; this undoes
// that. TestRecheckSeesChanges ("table made dormant") and
// TestRecheckOwnedTable fail if a library update decodes it right.
func nftTableFlags(t *nftables.Table) uint32 {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], t.Flags)
	return binary.BigEndian.Uint32(b[:])
}

func nftUninstall(s *session) error {
	c, err := s.conn()
	var ok bool
	if err == nil {
		ok, err = nftPresent(c)
	}
	if err != nil {
		s.reset()
		if errors.Is(err, unix.EPROTONOSUPPORT) || errors.Is(err, unix.ENOENT) {
			return nil // no nf_tables: nothing of ours can be there
		}
		return fmt.Errorf("listing nftables tables: %w", err)
	}
	if !ok {
		return nil
	}
	c.DelTable(&nftables.Table{Name: TableName, Family: nftables.TableFamilyINet})
	if err := c.Flush(); err != nil {
		s.reset()
		if !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("deleting table inet %s: %w", TableName, err)
		}
	}
	return nil
}

// nftVerify compares the live table with spec: chain types, hooks and
// priorities, and each rule's text and expressions, in order.
func nftVerify(ss *session, s Spec) error {
	c, err := ss.conn()
	if err != nil {
		return err
	}
	lt, err := nftTable(c)
	if err != nil {
		return ss.failed(fmt.Errorf("listing nftables tables: %w", err))
	}
	if lt == nil {
		return fmt.Errorf("nftables table inet %s is missing", TableName)
	}
	var problems []string
	if nftTableFlags(lt)&nftTableDormant != 0 {
		problems = append(problems, "the table is dormant (its rules see no packet)")
	}
	t := &nftables.Table{Name: TableName, Family: nftables.TableFamilyINet}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return ss.failed(fmt.Errorf("listing chains: %w", err))
	}
	live := map[string]*nftables.Chain{}
	for _, ch := range chains {
		if ch.Table.Name == TableName {
			live[ch.Name] = ch
		}
	}
	want := nftRulesByHook(s)
	for _, h := range hooksOf(s) {
		d := nftChains[h]
		ch, ok := live[d.name]
		if !ok {
			problems = append(problems, "chain "+d.name+" missing")
			continue
		}
		delete(live, d.name)
		if ch.Type != d.typ || ch.Hooknum == nil || *ch.Hooknum != *d.hook || ch.Priority == nil || *ch.Priority != *d.priority {
			problems = append(problems, "chain "+d.name+" has the wrong type, hook or priority")
			continue
		}
		got, err := c.GetRules(t, ch)
		if err != nil {
			return ss.failed(fmt.Errorf("listing rules of chain %s: %w", d.name, err))
		}
		problems = append(problems, compareNftRules(d.name, got, want[h])...)
	}
	for name := range live {
		problems = append(problems, "unexpected chain "+name)
	}
	if len(problems) > 0 {
		return fmt.Errorf("nftables table inet %s differs: %s", TableName, strings.Join(problems, "; "))
	}
	return nil
}

func compareNftRules(chain string, got []*nftables.Rule, want []nftRule) []string {
	var problems []string
	for i, w := range want {
		if i >= len(got) {
			problems = append(problems, fmt.Sprintf("chain %s: rule %q missing", chain, w.text))
			continue
		}
		g := got[i]
		if string(g.UserData) != userdataPrefix+w.text {
			problems = append(problems, fmt.Sprintf("chain %s rule %d: want %q, found %q", chain, i, w.text, strings.TrimPrefix(string(g.UserData), userdataPrefix)))
			continue
		}
		if !sameExprs(g.Exprs, w.exprs) {
			problems = append(problems, fmt.Sprintf("chain %s rule %d (%q) was altered", chain, i, w.text))
		}
	}
	for i := len(want); i < len(got); i++ {
		problems = append(problems, fmt.Sprintf("chain %s: unexpected extra rule %d", chain, i))
	}
	return problems
}

// sameExprs compares live expressions with wanted ones by their
// marshalled form. The wanted side first takes the same unmarshal round
// trip as the live side, because the library's decoders drop some
// attributes (expr.Ct forgets its source register) and both sides must
// lose the same.
func sameExprs(live, want []expr.Any) bool {
	if len(live) != len(want) {
		return false
	}
	fam := byte(nftables.TableFamilyINet)
	for i := range live {
		w := want[i]
		if d, err := expr.MarshalExprData(fam, w); err == nil {
			n := reflect.New(reflect.TypeOf(w).Elem()).Interface().(expr.Any)
			if expr.Unmarshal(fam, d, n) == nil {
				w = n
			}
		}
		ab, err1 := expr.Marshal(fam, live[i])
		bb, err2 := expr.Marshal(fam, w)
		if err1 != nil || err2 != nil || !bytes.Equal(ab, bb) {
			return false
		}
	}
	return true
}
