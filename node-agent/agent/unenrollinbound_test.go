package agent

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/e2e/lab"
	"github.com/ambit-mesh/ambit/internal/testenv"
)

// TestUnenrollDrainsInboundStreams: a client pod of the node holds a
// stream (through its agent, over real HBONE) to web's app when web
// leaves the mesh live. The agent delivers that stream to web's app from
// the client's own IP, so the app's replies reach the agent's socket
// only through policy routing by mark; the unenrollment removed that
// with the redirection, the replies left web for the client pod itself,
// and the stream hung until timeouts (it had no drain at all). Now the
// stream keeps carrying bytes both ways during the drain, while a new
// connection to web goes in plaintext straight to its app, and nothing
// held for the drain is left in web once it ends: by the stream's end,
// by web's DEL cutting the drain, or by drainTimeout. Both rule
// backends (the marks are set by nftables' or by iptables' rules).
func TestUnenrollDrainsInboundStreams(t *testing.T) {
	for i, backend := range []string{"nftables", "iptables-legacy"} {
		for j, end := range []string{"closed", "del", "timeout"} {
			t.Run(backend+"/"+end, func(t *testing.T) {
				drain := 30 * time.Second
				if end == "timeout" {
					drain = 3 * time.Second
				}
				d := newDrainNode(t, fmt.Sprintf("10.97.%d.0/24", 3*i+j), backend, drain)
				cli, _ := d.add(t, "client")
				web, _ := d.add(t, "web") // the inventory's workload: its labels are the test's
				unlock := d.h.a.lock("apps", "web")
				used := d.h.a.podByName("apps/web").rec.Backend
				unlock()
				if used != backend {
					t.Fatalf("web's rules are %s's, want %s's", used, backend)
				}
				c := held(t, cli, web.IP)
				inbound := map[string]string{"direction": "inbound"}
				opened := testenv.Metric(t, d.reg, "ambit_tunnel_connections_opened_total", inbound)
				if opened < 1 {
					t.Fatalf("inbound connections opened: %v, want the stream's", opened)
				}

				d.unenroll(t, "web")
				for n := range 3 {
					c.SetDeadline(time.Now().Add(5 * time.Second))
					r, err := lab.AskOn(c, fmt.Sprintf("drained %d", n))
					if err != nil || r.App != "web" || r.Peer != cli.IP || r.Echo != fmt.Sprintf("drained %d", n) {
						t.Fatalf("round trip %d on the stream to web after its unenrollment: %+v %v (cut or hung, not drained)", n, r, err)
					}
				}
				if left := drainLeft(t, web); left == "" {
					t.Fatal("nothing held for the drain while it runs (the check after it would prove nothing)")
				}
				// New connections are not web's agent's any more.
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				r, err := cli.Ask(ctx, netip.AddrPortFrom(web.IP, 8080), "new")
				cancel()
				if err != nil || r.App != "web" || r.Peer != cli.IP {
					t.Fatalf("new connection to web during the drain: %+v %v", r, err)
				}
				if n := testenv.Metric(t, d.reg, "ambit_tunnel_connections_opened_total", inbound); n != opened {
					t.Fatalf("web's agent took a new connection during the drain (inbound opened %v, was %v), want it straight to the app", n, opened)
				}

				switch end {
				case "closed":
					c.Close()
				case "del":
					d.del(t, web)
					endsSoon(t, c, "the client's stream to web, its drain cut by web's DEL")
				case "timeout":
					// The stream stays open: the drain ends at its
					// deadline and cuts it.
					c.SetReadDeadline(time.Now().Add(drain + 10*time.Second))
					if _, err := c.Read(make([]byte, 1)); err == nil {
						t.Fatal("the stream to web read data after the drain's deadline, want its end")
					}
				}
				for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(20 * time.Millisecond) {
					left := drainLeft(t, web)
					if left == "" {
						break
					}
					if time.Now().After(deadline) {
						t.Fatalf("15 s after the drain's end web still holds:\n%s", left)
					}
				}
			})
		}
	}
}

// newDrainNode is newDelNode with the pods' rule backend (the
// conflist's ruleBackend) and the agent's drainTimeout the test's.
func newDrainNode(t *testing.T, cidr, backend string, drain time.Duration) *delNode {
	t.Helper()
	return newDelNodeOn(t, cidr, backend, func(o *Options) { o.Config.DrainTimeout.Duration = drain })
}

// unenroll takes the inventory's workload apps/name out of the mesh by
// its label and waits for the agent to have unenrolled it.
func (d *delNode) unenroll(t *testing.T, name string) {
	t.Helper()
	d.setInventory(t, invAmbient+"    labels: {ambit.dev/dataplane-mode: none}\n", name, false)
}

// reenroll puts the inventory's workload apps/name back in the mesh
// (its label gone) and waits for the agent to have enrolled it again.
func (d *delNode) reenroll(t *testing.T, name string) {
	t.Helper()
	d.setInventory(t, invAmbient, name, true)
}

// reenrolledDuringDrain adds a client pod and web (the inventory's
// workload), holds a stream from the client's app to web's, unenrolls
// web (the stream drains) and enrolls it again while it does.
func (d *delNode) reenrolledDuringDrain(t *testing.T) (cli, web *lab.Pod, c net.Conn) {
	t.Helper()
	cli, _ = d.add(t, "client")
	web, _ = d.add(t, "web")
	c = held(t, cli, web.IP)
	d.unenroll(t, "web")
	d.reenroll(t, "web")
	return cli, web, c
}

// setInventory makes inv the agent's inventory and waits until it has
// apps/name enrolled or not, as want says.
func (d *delNode) setInventory(t *testing.T, inv, name string, want bool) {
	t.Helper()
	what := name + " unenrolled"
	if want {
		what = name + " enrolled again"
	}
	d.h.writeInventory(inv)
	if err := d.h.inv.Reload(); err != nil {
		t.Fatal(err)
	}
	eventually(t, what, func() bool {
		unlock := d.h.a.lock("apps", name)
		defer unlock()
		p := d.h.a.podByName("apps/" + name)
		return p != nil && p.enrolled() == want
	})
}

// drainLeft describes what p's namespace holds that neither the pod nor
// a redirection put there: the drain's nftables table, a policy routing
// rule other than the kernel's three, a route in a table other than
// local and main ("" when there is none).
func drainLeft(t *testing.T, p *lab.Pod) string {
	t.Helper()
	var left []string
	in := func(argv ...string) string {
		out, err := exec.Command("ip", append([]string{"netns", "exec", p.NetnsName}, argv...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("%v in %s: %v\n%s", argv, p.Name, err, out)
		}
		return string(out)
	}
	if out := in("nft", "list", "tables"); strings.Contains(out, drainTable) {
		left = append(left, strings.TrimSpace(out))
	}
	for _, fam := range []string{"-4", "-6"} {
		for _, l := range strings.Split(strings.TrimSpace(in("ip", fam, "rule", "show")), "\n") {
			if l == "" || strings.HasPrefix(l, "0:") || strings.HasPrefix(l, "32766:") || strings.HasPrefix(l, "32767:") {
				continue
			}
			left = append(left, "rule "+l)
		}
		for _, l := range strings.Split(strings.TrimSpace(in("ip", fam, "route", "show", "table", "all")), "\n") {
			if strings.Contains(l, " table ") && !strings.Contains(l, " table local ") {
				left = append(left, "route "+l)
			}
		}
	}
	return strings.Join(left, "\n")
}

// TestReenrollDuringDrain: web joins the mesh again while the stream of
// its unenrollment still drains. The end of that drain removes what it
// held and nothing of the new redirection, whose policy routing is the
// same rule and route but the redirection's own: web's rules verify, and
// a new connection to it goes through its agent again.
func TestReenrollDuringDrain(t *testing.T) {
	d := newDrainNode(t, "10.97.9.0/24", "nftables", 30*time.Second)
	cli, web, c := d.reenrolledDuringDrain(t)
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if r, err := lab.AskOn(c, "both"); err != nil || r.App != "web" {
		t.Fatalf("the draining stream once web is enrolled again: %+v %v", r, err)
	}
	c.Close()
	eventually(t, "the drain's tables removed", func() bool {
		out, err := exec.Command("ip", "netns", "exec", web.NetnsName, "nft", "list", "tables").CombinedOutput()
		return err == nil && !strings.Contains(string(out), drainTable)
	})
	// The drain's rule and route go with its tables (afterDrain).
	unlock := d.h.a.lock("apps", "web")
	spec := d.h.a.podByName("apps/web").spec
	unlock()
	if err := (Rules{}).Verify(context.Background(), openFile(t, web.Path), spec); err != nil {
		t.Fatalf("web's redirection once the earlier drain ended: %v", err)
	}
	inbound := map[string]string{"direction": "inbound"}
	opened := testenv.Metric(t, d.reg, "ambit_tunnel_connections_opened_total", inbound)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	r, err := cli.Ask(ctx, netip.AddrPortFrom(web.IP, 8080), "again")
	cancel()
	if err != nil || r.App != "web" || r.Peer != cli.IP {
		t.Fatalf("new connection to web enrolled again: %+v %v", r, err)
	}
	if n := testenv.Metric(t, d.reg, "ambit_tunnel_connections_opened_total", inbound); n != opened+1 {
		t.Fatalf("inbound connections opened %v, was %v: the new one did not reach web's agent", n, opened)
	}
}

// TestUnenrolledAgainDuringDrain: web, unenrolled with a stream open,
// enrolled again and given a second stream, is unenrolled again while
// the first drain still runs: two drains of one namespace. The first to
// end must leave the second its reply routing: before, its end removed
// what both held, and the second stream hung from then on.
func TestUnenrolledAgainDuringDrain(t *testing.T) {
	d := newDrainNode(t, "10.97.10.0/24", "nftables", 30*time.Second)
	cli, web, first := d.reenrolledDuringDrain(t)
	second := held(t, cli, web.IP)
	d.unenroll(t, "web")
	draining := func() int {
		unlock := d.h.a.lock("apps", "web")
		defer unlock()
		n := 0
		for _, dr := range d.h.a.podByName("apps/web").drains {
			select {
			case <-dr.done:
			default:
				n++
			}
		}
		return n
	}
	if n := draining(); n != 2 {
		t.Fatalf("%d drains of web, want 2", n)
	}

	first.Close()
	eventually(t, "the first drain ended", func() bool { return draining() == 1 })
	for n := range 3 {
		second.SetDeadline(time.Now().Add(5 * time.Second))
		if r, err := lab.AskOn(second, fmt.Sprintf("still %d", n)); err != nil || r.App != "web" || r.Peer != cli.IP {
			t.Fatalf("round trip %d on the second stream once the first drain ended: %+v %v", n, r, err)
		}
	}
	second.Close()
	eventually(t, "nothing of the drains left in web", func() bool { return drainLeft(t, web) == "" })
}
