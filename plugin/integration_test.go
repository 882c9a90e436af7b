package main

import (
	"context"
	"errors"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
	"github.com/ambit-mesh/ambit/plugin/redirect"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/ns"
)

var testBackends = []redirect.Backend{redirect.Nftables, redirect.IptablesNft, redirect.IptablesLegacy}

// The whole chain (bridge + host-local + portmap + ambit-cni) through
// libcni, against both reference plugin sets and every backend, and then
// real packets: what the redirection is for.
func TestEnrolledPodIsRedirected(t *testing.T) {
	testenv.RequireRoot(t)
	for _, set := range testenv.PluginSets(t) {
		for _, b := range testBackends {
			t.Run(set.Name+"/"+string(b), func(t *testing.T) {
				agent := newResponder(t, "mesh")
				n := newNode(t, set, nodeOpts{backend: b, withAmbit: true, socket: agent.socket})
				p := n.newPod("mesh")
				if err := n.add(p); err != nil {
					t.Fatalf("ADD: %v", err)
				}
				if !p.ip4.IsValid() || !p.ip6.IsValid() {
					t.Fatalf("pod got %v / %v, want both families", p.ip4, p.ip6)
				}
				// The agent got the pod, its IPs from prevResult and the fd.
				req := agent.last()
				if req.Op != cniproto.OpAdd || req.Pod.Namespace != "mesh" || agent.fdCount() != 1 ||
					!slices.ContainsFunc(req.Pod.IPs, func(p2 netip.Prefix) bool { return p2.Addr() == p.ip4 }) {
					t.Fatalf("agent request: %+v (fds %d)", req, agent.fdCount())
				}
				found, err := redirect.Installed(context.Background(), p.ns)
				if err != nil || len(found) != 1 || found[0] != b {
					t.Fatalf("installed: %v %v, want [%s]", found, err, b)
				}
				if err := redirect.Verify(context.Background(), p.ns, agent.spec); err != nil {
					t.Fatal(err)
				}
				proveRedirection(t, n, p)
				// CHECK passes on intact rules.
				if err := n.check(p); err != nil {
					t.Fatalf("CHECK: %v", err)
				}
				if err := n.del(p); err != nil {
					t.Fatalf("DEL: %v", err)
				}
				noRules(t, p)
				if ops := agent.ops(); ops[len(ops)-1] != cniproto.OpDel {
					t.Fatalf("agent not told of DEL: %v", ops)
				}
			})
		}
	}
}

// proveRedirection sends real connections through the pod's rules.
func proveRedirection(t *testing.T, n *node, p *pod) {
	t.Helper()
	podIn := listenAll(t, p.ns, 15001, 15006, 15008, 8080)
	nodeIn := listenAll(t, n.ns, 9090)
	gw4, gw6 := n.subnet4.Addr().Next(), n.subnet6.Addr().Next()
	for _, fam := range []struct {
		name   string
		podIP  netip.Addr
		gw     netip.Addr
		probe  netip.Addr
		prefix int
	}{
		{"IPv4", p.ip4, gw4, redirect.DefaultProbeSNATv4, 32},
		{"IPv6", p.ip6, gw6, redirect.DefaultProbeSNATv6, 128},
	} {
		// Outbound: the app's connection to an outside address lands on
		// 15001 in the pod, which still knows the real destination.
		outside := netip.AddrPortFrom(fam.gw, 9090)
		dialFrom(t, p.ns, netip.Addr{}, 0, outside)
		c := expectAccept(t, podIn, 15001, fam.name+" outbound")
		if od := originalDst(t, c); od != outside {
			t.Fatalf("%s outbound: SO_ORIGINAL_DST %s, want %s", fam.name, od, outside)
		}
		// Inbound plaintext to the app port lands on 15006.
		dialFrom(t, n.ns, netip.Addr{}, 0, netip.AddrPortFrom(fam.podIP, 8080))
		c = expectAccept(t, podIn, 15006, fam.name+" inbound")
		if od := originalDst(t, c); od != netip.AddrPortFrom(fam.podIP, 8080) {
			t.Fatalf("%s inbound: SO_ORIGINAL_DST %s", fam.name, od)
		}
		// HBONE is never redirected.
		dialFrom(t, n.ns, netip.Addr{}, 0, netip.AddrPortFrom(fam.podIP, 15008))
		expectAccept(t, podIn, 15008, fam.name+" HBONE")
		// A SNATed kubelet probe reaches the app directly.
		bridge := bridgeName(n)
		err := n.ns.Do(func(ns.NetNS) error {
			return exec.Command("ip", "addr", "add", netip.PrefixFrom(fam.probe, fam.prefix).String(), "dev", bridge, "nodad").Run()
		})
		if err != nil {
			t.Fatalf("adding probe address: %v", err)
		}
		dialFrom(t, n.ns, fam.probe, 0, netip.AddrPortFrom(fam.podIP, 8080))
		expectAccept(t, podIn, 8080, fam.name+" probe")
		// The agent's own (marked) sockets are never captured.
		dialFrom(t, p.ns, netip.Addr{}, redirect.DefaultMark, outside)
		expectAccept(t, nodeIn, 9090, fam.name+" marked outbound")
	}
}

func bridgeName(n *node) string {
	var conf map[string]any
	_ = jsonUnmarshal(n.list.Plugins[0].Bytes, &conf)
	return conf["bridge"].(string)
}

func TestNotEnrolledPodHasNoRules(t *testing.T) {
	testenv.RequireRoot(t)
	for _, set := range testenv.PluginSets(t) {
		t.Run(set.Name, func(t *testing.T) {
			agent := newResponder(t, "mesh")
			n := newNode(t, set, nodeOpts{backend: redirect.Auto, withAmbit: true, socket: agent.socket})
			p := n.newPod("plain")
			if err := n.add(p); err != nil {
				t.Fatal(err)
			}
			noRules(t, p)
			if len(agent.ops()) != 1 {
				t.Fatalf("agent calls: %v", agent.ops())
			}
			// An excluded namespace never reaches the agent.
			q := n.newPod("kube-system")
			if err := n.add(q); err != nil {
				t.Fatal(err)
			}
			noRules(t, q)
			if len(agent.ops()) != 1 {
				t.Fatalf("excluded namespace reached the agent: %v", agent.ops())
			}
			if err := n.check(p); err != nil {
				t.Fatalf("CHECK of an unenrolled pod: %v", err)
			}
		})
	}
}

func TestAddTwiceAndCheckDetectsDeletedRule(t *testing.T) {
	testenv.RequireRoot(t)
	set := testenv.PluginSets(t)[1]
	for _, b := range []redirect.Backend{redirect.Nftables, redirect.IptablesNft} {
		t.Run(string(b), func(t *testing.T) {
			agent := newResponder(t, "mesh")
			n := newNode(t, set, nodeOpts{backend: b, withAmbit: true, socket: agent.socket})
			p := n.newPod("mesh")
			if err := n.add(p); err != nil {
				t.Fatal(err)
			}
			// The runtime re-runs ADD (retry after a timeout): same state.
			out, cerr := runAmbit(t, n.bin, "ADD", n.directConf(p, nil), p.env("")...)
			if cerr != nil {
				t.Fatalf("second ADD: %v", cerr)
			}
			if !strings.Contains(string(out), p.ip4.String()) {
				t.Fatalf("second ADD did not return prevResult: %s", out)
			}
			if err := redirect.Verify(context.Background(), p.ns, agent.spec); err != nil {
				t.Fatalf("after ADD twice: %v", err)
			}
			// Someone deletes one rule: CHECK must notice.
			err := p.ns.Do(func(ns.NetNS) error {
				if b == redirect.Nftables {
					return exec.Command("nft", "flush", "chain", "inet", redirect.TableName, "nat-prerouting").Run()
				}
				return exec.Command("iptables-nft", "-t", "nat", "-D", redirect.ChainPrerouting, "1").Run()
			})
			if err != nil {
				t.Fatal(err)
			}
			err = n.check(p)
			var te *types.Error
			if !errors.As(err, &te) || te.Code != cniproto.CodeCheck {
				t.Fatalf("CHECK after deleting a rule: %v, want code %d", err, cniproto.CodeCheck)
			}
			t.Logf("CHECK: %v", te)
			if err := n.del(p); err != nil {
				t.Fatal(err)
			}
			noRules(t, p)
		})
	}
}

func TestDelAfterNetnsIsGone(t *testing.T) {
	testenv.RequireRoot(t)
	for _, set := range testenv.PluginSets(t) {
		t.Run(set.Name, func(t *testing.T) {
			agent := newResponder(t, "mesh")
			n := newNode(t, set, nodeOpts{backend: redirect.Auto, withAmbit: true, socket: agent.socket})
			p := n.newPod("mesh")
			if err := n.add(p); err != nil {
				t.Fatal(err)
			}
			p.ns.Close()
			if err := exec.Command("ip", "netns", "delete", p.name).Run(); err != nil {
				t.Fatal(err)
			}
			if err := n.del(p); err != nil {
				t.Fatalf("DEL after the netns is gone: %v", err)
			}
			if err := n.del(p); err != nil {
				t.Fatalf("second DEL: %v", err)
			}
			if ops := agent.ops(); ops[len(ops)-1] != cniproto.OpDel {
				t.Fatalf("agent not told: %v", ops)
			}
		})
	}
}

// Many sandboxes at once (a node starting a deployment): every pod comes
// up, each with exactly its own rules, and all of them go away again.
func TestConcurrentAdds(t *testing.T) {
	testenv.RequireRoot(t)
	const pods = 8
	set := testenv.PluginSets(t)[1]
	agent := newResponder(t, "mesh")
	n := newNode(t, set, nodeOpts{backend: redirect.Auto, withAmbit: true, socket: agent.socket})
	ps := make([]*pod, pods)
	for i := range ps {
		ps[i] = n.newPod("mesh")
	}
	errs := make(chan error, pods)
	for _, p := range ps {
		go func() { errs <- n.add(p) }()
	}
	for range ps {
		if err := <-errs; err != nil {
			t.Fatalf("concurrent ADD: %v", err)
		}
	}
	for _, p := range ps {
		if err := redirect.Verify(context.Background(), p.ns, agent.spec); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range ps {
		go func() { errs <- n.del(p) }()
	}
	for range ps {
		if err := <-errs; err != nil {
			t.Fatalf("concurrent DEL: %v", err)
		}
	}
	for _, p := range ps {
		noRules(t, p)
	}
}
