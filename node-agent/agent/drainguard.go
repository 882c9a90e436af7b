package agent

import (
	"errors"
	"os"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"
)

// The kernel applies a connection's NAT binding (the REDIRECT to our
// listener) only while some NAT chain of the family is registered in the
// namespace. Removing the pod's redirection deletes the last one, so every
// established redirected connection would suddenly be sent, untranslated,
// to its original destination, which answers with a reset. To drain
// instead of cut, an empty NAT chain (table "ambit-drain", no rules,
// nothing captured) holds the NAT hooks while established connections
// finish, and is removed after the drain.

const drainTable = "ambit-drain"

func addDrainGuard(f *os.File) error {
	c, err := nftables.New(nftables.WithNetNSFd(int(f.Fd())))
	if err != nil {
		return err
	}
	for _, fam := range []nftables.TableFamily{nftables.TableFamilyIPv4, nftables.TableFamilyIPv6} {
		t := c.AddTable(&nftables.Table{Family: fam, Name: drainTable})
		c.AddChain(&nftables.Chain{Name: "hold-nat", Table: t, Type: nftables.ChainTypeNAT, Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource})
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
