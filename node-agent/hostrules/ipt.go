package hostrules

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"runtime"
	"strconv"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/ambit-mesh/ambit/plugin/redirect"
)

const (
	iptDefaultChain = "AMBIT-POSTRT"
	iptDefaultSet   = "ambit-probes"
)

// iptBackend: ipsets (hash:ip, comment = pod UID) and one nat chain per
// family, through the iptables binaries (iptTool). Set contents are swapped in atomically; the
// chain holds one rule and is only rewritten when that rule is missing.
type iptBackend struct {
	cfg     Config
	variant string // "legacy" or "nft"
	chain   string
	set4    string
	set6    string
	ipt4    *iptTool
	ipt6    *iptTool
}

func newIPT(cfg Config) (*iptBackend, error) {
	b := &iptBackend{cfg: cfg, chain: iptDefaultChain, set4: iptDefaultSet + "-v4", set6: iptDefaultSet + "-v6"}
	if cfg.Name != "" {
		b.chain, b.set4, b.set6 = cfg.Name, cfg.Name+"-v4", cfg.Name+"-v6"
	}
	if len(b.chain) > 28 || len(b.set6)+4 > 31 {
		return nil, fmt.Errorf("hostrules: name %q too long for an iptables chain/ipset", cfg.Name)
	}
	v := cfg.IPTablesVariant
	switch v {
	case "legacy", "iptables-legacy":
		b.variant = "legacy"
	case "nft", "iptables-nft":
		b.variant = "nft"
	case "":
		be, why := redirect.DetectIptables()
		b.variant = "nft"
		if be == redirect.IptablesLegacy {
			b.variant = "legacy"
		}
		cfg.Logger.Info("iptables variant for host probe rules", "variant", b.variant, "why", why)
	default:
		return nil, fmt.Errorf("hostrules: iptables variant %q is not legacy or nft", v)
	}
	p4, err := exec.LookPath("iptables-" + b.variant)
	if err != nil {
		return nil, fmt.Errorf("hostrules: iptables backend: %w", err)
	}
	b.ipt4 = &iptTool{name: "iptables-" + b.variant, path: p4, locks: b.variant == "legacy", bound: cfg.RunTimeout}
	if cfg.IPv4Only {
		return b, nil
	}
	p6, err := exec.LookPath("ip6tables-" + b.variant)
	if err != nil {
		return nil, fmt.Errorf("hostrules: iptables backend: %w (set the agent's ipv6: off on hosts without IPv6 NAT)", err)
	}
	b.ipt6 = &iptTool{name: "ip6tables-" + b.variant, path: p6, locks: b.variant == "legacy", bound: cfg.RunTimeout}
	return b, nil
}

func (b *iptBackend) name() string { return "iptables-" + b.variant }

// in runs fn in the managed network namespace on a locked thread: the
// iptables binaries exec'd and the ipset netlink sockets opened from that
// thread inherit it.
func (b *iptBackend) in(fn func() error) error {
	if b.cfg.NetNS <= 0 {
		return fn()
	}
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer orig.Close()
	if err := netns.Set(b.cfg.NetNS); err != nil {
		runtime.UnlockOSThread()
		return err
	}
	ferr := fn()
	if err := netns.Set(orig); err != nil {
		// The thread is in the wrong namespace: leave it locked so the
		// runtime discards it when the goroutine ends.
		return errors.Join(ferr, fmt.Errorf("hostrules: restoring netns: %w", err))
	}
	runtime.UnlockOSThread()
	return ferr
}

func (b *iptBackend) spec(v6 bool) []string {
	set, src := b.set4, b.cfg.ProbeSNATv4
	if v6 {
		set, src = b.set6, b.cfg.ProbeSNATv6
	}
	owner := []string{"-m", "owner", "--socket-exists"}
	if b.cfg.KubeletUID != nil {
		owner = []string{"-m", "owner", "--uid-owner", strconv.FormatUint(uint64(*b.cfg.KubeletUID), 10)}
	}
	s := []string{"-p", "tcp", "-m", "set", "--match-set", set, "dst"}
	s = append(s, owner...)
	return append(s, "-j", "SNAT", "--to-source", src.String())
}

func (b *iptBackend) jump() []string { return []string{"-j", b.chain} }

func (b *iptBackend) families() []struct {
	ipt *iptTool
	v6  bool
	set string
} {
	fams := []struct {
		ipt *iptTool
		v6  bool
		set string
	}{{b.ipt4, false, b.set4}, {b.ipt6, true, b.set6}}
	if b.cfg.IPv4Only {
		return fams[:1]
	}
	return fams
}

func (b *iptBackend) check(ctx context.Context, want map[netip.Addr]string) (string, error) {
	drift := ""
	err := b.in(func() error {
		got := map[netip.Addr]string{}
		for _, f := range b.families() {
			res, err := netlink.IpsetList(f.set)
			if err != nil {
				drift = "ipset " + f.set + " missing"
				return nil
			}
			for _, e := range res.Entries {
				ip, valid := netip.AddrFromSlice(e.IP)
				if !valid {
					drift = "ipset entry with a bad address"
					return nil
				}
				got[ip.Unmap()] = e.Comment
			}
			// A run cut by ctx is the caller's end, not drift.
			if exists, err := f.ipt.chainExists(ctx, "nat", b.chain); ctx.Err() != nil {
				return err
			} else if err != nil || !exists {
				drift = "chain " + b.chain + " missing"
				return nil
			}
			if rules, err := f.ipt.list(ctx, "nat", b.chain); ctx.Err() != nil {
				return err
			} else if err != nil || len(rules) != 2 {
				drift = "chain " + b.chain + " does not hold exactly one rule"
				return nil
			}
			if exists, err := f.ipt.exists(ctx, "nat", b.chain, b.spec(f.v6)...); ctx.Err() != nil {
				return err
			} else if err != nil || !exists {
				drift = "the SNAT rule is not in " + b.chain
				return nil
			}
			if exists, err := f.ipt.exists(ctx, "nat", "POSTROUTING", b.jump()...); ctx.Err() != nil {
				return err
			} else if err != nil || !exists {
				drift = "the jump from POSTROUTING is missing"
				return nil
			}
		}
		if len(got) != len(want) {
			drift = fmt.Sprintf("%d ipset entries, want %d", len(got), len(want))
			return nil
		}
		for ip, uid := range want {
			if got[ip] != uid {
				drift = fmt.Sprintf("ipset entry %s owned by %q, want %q", ip, got[ip], uid)
				return nil
			}
		}
		return nil
	})
	return drift, err
}

func family(v6 bool) uint8 {
	if v6 {
		return unix.AF_INET6
	}
	return unix.AF_INET
}

func entry(ip netip.Addr, uid string) *netlink.IPSetEntry {
	return &netlink.IPSetEntry{IP: net.IP(ip.AsSlice()), Comment: uid, Replace: true}
}

func (b *iptBackend) write(ctx context.Context, want map[netip.Addr]string) error {
	return b.in(func() error {
		for _, f := range b.families() {
			// Fill a temporary set and swap it in: the live set is never
			// half-filled.
			tmp := f.set + "-tmp"
			opts := netlink.IpsetCreateOptions{Replace: true, Comments: true, Family: family(f.v6)}
			if err := netlink.IpsetCreate(f.set, "hash:ip", opts); err != nil {
				return fmt.Errorf("ipset create %s: %w", f.set, err)
			}
			if err := netlink.IpsetCreate(tmp, "hash:ip", opts); err != nil {
				return fmt.Errorf("ipset create %s: %w", tmp, err)
			}
			if err := netlink.IpsetFlush(tmp); err != nil {
				return fmt.Errorf("ipset flush %s: %w", tmp, err)
			}
			for ip, uid := range want {
				if ip.Is6() != f.v6 {
					continue
				}
				if err := netlink.IpsetAdd(tmp, entry(ip, uid)); err != nil {
					return fmt.Errorf("ipset add %s %s: %w", tmp, ip, err)
				}
			}
			if err := netlink.IpsetSwap(tmp, f.set); err != nil {
				return fmt.Errorf("ipset swap %s: %w", f.set, err)
			}
			if err := netlink.IpsetDestroy(tmp); err != nil {
				return fmt.Errorf("ipset destroy %s: %w", tmp, err)
			}
			// The chain: rewritten only when its one rule is not exactly ours.
			exists, err := f.ipt.chainExists(ctx, "nat", b.chain)
			if err != nil {
				return err
			}
			good := false
			if exists {
				rules, lerr := f.ipt.list(ctx, "nat", b.chain)
				has, eerr := f.ipt.exists(ctx, "nat", b.chain, b.spec(f.v6)...)
				if ctx.Err() != nil {
					return cmp.Or(lerr, eerr, ctx.Err())
				}
				good = lerr == nil && eerr == nil && has && len(rules) == 2
			}
			if !good {
				if err := f.ipt.clearChain(ctx, "nat", b.chain); err != nil {
					return err
				}
				if err := f.ipt.append(ctx, "nat", b.chain, b.spec(f.v6)...); err != nil {
					return err
				}
			}
			if has, err := f.ipt.exists(ctx, "nat", "POSTROUTING", b.jump()...); err != nil {
				return err
			} else if !has {
				if err := f.ipt.insert(ctx, "nat", "POSTROUTING", 1, b.jump()...); err != nil {
					return err
				}
			}
		}
		return nil
	})
}

func (b *iptBackend) set(ip netip.Addr) string {
	if ip.Is6() {
		return b.set6
	}
	return b.set4
}

func (b *iptBackend) upsert(add map[netip.Addr]string, replaced map[netip.Addr]bool) error {
	return b.in(func() error {
		for ip, uid := range add {
			if replaced[ip] {
				if err := netlink.IpsetDel(b.set(ip), entry(ip, "")); err != nil {
					return err
				}
			}
			if err := netlink.IpsetAdd(b.set(ip), entry(ip, uid)); err != nil {
				return err
			}
		}
		return nil
	})
}

func (b *iptBackend) remove(ips []netip.Addr) error {
	return b.in(func() error {
		for _, ip := range ips {
			if err := netlink.IpsetDel(b.set(ip), entry(ip, "")); err != nil {
				return err
			}
		}
		return nil
	})
}

func (b *iptBackend) uninstall() error {
	return b.in(func() error {
		// Not a request's: each run keeps its own bound.
		ctx := context.Background()
		var errs []error
		for _, f := range b.families() {
			// Without the chain there is no jump to it (iptables keeps a
			// chain something jumps to), and -C of the jump would exit 2
			// ("Couldn't load target"), not 1: an uninstall run again
			// must find nothing to do, not fail.
			if exists, err := f.ipt.chainExists(ctx, "nat", b.chain); err != nil {
				errs = append(errs, err)
			} else if exists {
				if err := f.ipt.deleteAll(ctx, "nat", "POSTROUTING", b.jump()...); err != nil {
					errs = append(errs, err)
				}
				if err := f.ipt.clearAndDeleteChain(ctx, "nat", b.chain); err != nil {
					errs = append(errs, err)
				}
			}
			// The set can only go once no rule references it. The
			// temporary one is there when a write stopped between
			// filling and destroying it (an error, a crash).
			for _, set := range []string{f.set, f.set + "-tmp"} {
				if _, err := netlink.IpsetList(set); err == nil {
					if err := netlink.IpsetDestroy(set); err != nil {
						errs = append(errs, fmt.Errorf("ipset destroy %s: %w", set, err))
					}
				}
			}
		}
		return errors.Join(errs...)
	})
}
