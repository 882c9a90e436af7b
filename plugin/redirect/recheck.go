package redirect

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Checked is what the checks of one netns saw so far, kept by the caller
// between Recheck calls on that netns (the zero value: nothing yet). It
// is not safe for concurrent use.
type Checked struct {
	// seen is the nf_tables generation read at the previous check.
	seen   uint32
	seenOK bool
	// gen, spec: the rules were found exactly right at generation gen,
	// for spec (ok), by nftables or iptables-nft.
	gen  uint32
	spec Spec
	ok   bool
}

// Trusted reports whether the last check found the nf_tables rules right
// at a generation an earlier check had seen: the next check skips them if
// the generation is still that one.
func (c *Checked) Trusted() bool { return c.ok }

// Recheck is Verify for checking the same netns again and again: it
// returns the same answer, but skips reading and comparing the nf_tables
// rules when they provably have not changed since they were last found
// right, which is most of what Verify costs.
//
// Every committed nf_tables transaction in a netns (nft, iptables-nft,
// this package, anyone) increments that netns's ruleset generation
// (NFT_MSG_GETGEN), and nothing else changes the ruleset but the removal
// of a table with the owner flag when its creator's socket closes (a
// netns holding such a table is always checked in full). If the
// generation is the one at which the nftables or iptables-nft rules were
// found right, they are still right. Routes, ip rules and iptables-legacy
// state have no such counter and are read on every call.
//
// The kernel increments the generation just before it makes a
// transaction's changes visible, so a check that reads the generation at
// that instant can see the new number and the old rules. A generation is
// therefore trusted only once an earlier check had already read it (by
// then that transaction was complete): after a change, the next two
// checks read everything.
//
// ctx bounds the iptables runs of a full check, as for Verify.
func Recheck(ctx context.Context, netns ns.NetNS, spec Spec, c *Checked) error {
	if err := spec.Validate(); err != nil {
		return err
	}
	// One trip into the netns opens both sockets and looks for legacy
	// tables; the sockets stay in the netns after the thread leaves it.
	var nf, rt *rawNetlink
	var legacy bool
	var rtErr error
	err := inNetns(netns, func() {
		legacy = legacyTablesHere()
		nf, _ = dialNetfilterHere() // nil: answered below as "no generation"
		rt, rtErr = openRawNetlink(unix.NETLINK_ROUTE)
	})
	if nf != nil {
		defer nf.Close()
	}
	if rt != nil {
		defer rt.Close()
	}
	if err == nil {
		err = rtErr
	}
	if err != nil {
		return fmt.Errorf("opening netlink sockets in %s: %w", netns.Path(), err)
	}
	gen, genErr := uint32(0), errors.New("no nfnetlink socket")
	if nf != nil {
		gen, genErr = rulesetGeneration(nf)
	}
	if genErr == nil && c.ok && c.gen == gen && c.spec == spec && !legacy {
		c.seen = gen
		if problems := (&rtConn{exec: rt.Execute, path: netns.Path()}).verify(spec); len(problems) > 0 {
			c.ok = false
			return fmt.Errorf("redirection in %s: %s", netns.Path(), strings.Join(problems, "; "))
		}
		return nil
	}
	// A legacy nat, mangle or filter table may hold chains of ours: the
	// full check looks.
	s := newSession(ctx, netns)
	defer s.close()
	backend, err := verify(s, spec)
	prev, prevOK := c.seen, c.seenOK
	*c = Checked{seen: gen, seenOK: genErr == nil}
	if err == nil && genErr == nil && prevOK && prev == gen && (backend == Nftables || backend == IptablesNft) && !ownedTables(s) {
		c.gen, c.spec, c.ok = gen, spec, true
	}
	return err
}

// ownedTables reports whether the netns holds a table with the owner
// flag (or cannot tell). The kernel removes such a table when its
// creator's socket closes, without a new generation; a netns with one is
// always checked in full. Ours never has the flag, but someone could
// recreate our table, or the iptables-nft tables, with it.
func ownedTables(s *session) bool {
	c, err := s.conn()
	if err != nil {
		return true
	}
	ts, err := c.ListTables()
	if err != nil {
		s.reset()
		return true
	}
	for _, t := range ts {
		if nftTableFlags(t)&nftTableOwner != 0 {
			return true
		}
	}
	return false
}

// The nfnetlink message types of NFT_MSG_GETGEN and of its answer.
const (
	nftGetGen = netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_GETGEN)
	nftNewGen = netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_NEWGEN)
)

// dialNetfilterHere opens an nfnetlink socket in the calling thread's
// netns.
func dialNetfilterHere() (*rawNetlink, error) {
	return openRawNetlink(unix.NETLINK_NETFILTER)
}

// rulesetGeneration asks for the nf_tables ruleset generation of the
// netns c was opened in. An error means no nf_tables there (or no
// answer): nothing can be skipped.
func rulesetGeneration(c *rawNetlink) (uint32, error) {
	// struct nfgenmsg: family, version, resource id (big endian).
	msgs, err := c.Execute(netlink.Message{
		Header: netlink.Header{Type: nftGetGen, Flags: netlink.Request},
		Data:   []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, 0},
	})
	if err != nil {
		return 0, fmt.Errorf("reading the nf_tables generation: %w", err)
	}
	for _, m := range msgs {
		if m.Header.Type != nftNewGen || len(m.Data) < 4 {
			continue
		}
		ad, err := netlink.NewAttributeDecoder(m.Data[4:])
		if err != nil {
			return 0, err
		}
		ad.ByteOrder = binary.BigEndian
		for ad.Next() {
			if ad.Type() == unix.NFTA_GEN_ID {
				return ad.Uint32(), nil
			}
		}
		if err := ad.Err(); err != nil {
			return 0, err
		}
	}
	return 0, errors.New("the nf_tables generation answer has no NFTA_GEN_ID")
}
