package agent

import (
	"errors"
	"os"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// The kernel applies a connection's NAT binding (the REDIRECT to our
// listener) only while connection tracking and the NAT hooks are
// registered in the namespace, and both are registered only while some
// rule needs them. Removing the pod's redirection drops the last user, so
// every established redirected connection would suddenly leave,
// untranslated, for its original destination, which answers with a reset
// (seen in TestLiveLabelFlip). To drain instead of cut, table
// "ambit-drain" holds a NAT base chain and one rule that only loads the
// conntrack state (it matches, captures and changes nothing) while
// established connections finish, and is removed after the drain.

const drainTable = "ambit-drain"

func addDrainGuard(f *os.File) error {
	c, err := nftables.New(nftables.WithNetNSFd(int(f.Fd())))
	if err != nil {
		return err
	}
	for _, fam := range []nftables.TableFamily{nftables.TableFamilyIPv4, nftables.TableFamilyIPv6} {
		t := c.AddTable(&nftables.Table{Family: fam, Name: drainTable})
		ch := c.AddChain(&nftables.Chain{Name: "hold-nat", Table: t, Type: nftables.ChainTypeNAT, Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource})
		// A conntrack expression keeps connection tracking itself
		// registered in the namespace; it only loads a register.
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{&expr.Ct{Register: 1, Key: expr.CtKeySTATE}}})
	}
	return c.Flush()
}

func delDrainGuard(f *os.File) error {
	c, err := nftables.New(nftables.WithNetNSFd(int(f.Fd())))
	if err != nil {
		return err
	}
	var errs []error
	for _, fam := range []nftables.TableFamily{nftables.TableFamilyIPv4, nftables.TableFamilyIPv6} {
		c.DelTable(&nftables.Table{Family: fam, Name: drainTable})
		if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
