package redirect

import (
	"context"
	"os"
	"testing"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/internal/nstest"
	"github.com/containernetworking/plugins/pkg/ns"
)

// setIPv6 turns IPv6 off (or back on) in n the way a pod's sysctls do
// (net.ipv6.conf.{all,default,lo}.disable_ipv6).
func setIPv6(t *testing.T, n ns.NetNS, on bool) {
	t.Helper()
	v := "1"
	if on {
		v = "0"
	}
	err := n.Do(func(ns.NetNS) error {
		for _, k := range []string{"all", "default", "lo"} {
			if err := os.WriteFile("/proc/sys/net/ipv6/conf/"+k+"/disable_ipv6", []byte(v), 0o644); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestIPv6TurnedOffAfterInstall: the runtime applies a pod's sysctls
// when it starts the sandbox, after the CNI ADD (containerd: network
// set-up, then the pause container), so IPv6 can go off in a pod whose
// dual-stack redirection is already in. The kernel then drops our IPv6
// local route with lo's IPv6, but the ip rule (tied to no device)
// stays. That is no difference to repair: the rule alone routes
// nothing, and a pod without IPv6 has no IPv6 to capture. Before, the
// check said "unexpected IPv6 rule" for every such pod (the agent's
// periodic check logged a repair and counted it, a CNI CHECK answered
// code 103); since session 16 every IPv4-only pod gets the IPv6 family,
// so this was any pod with disable_ipv6 set. Turned back on, the missing
// IPv6 route is a difference again, and an install brings it back.
func TestIPv6TurnedOffAfterInstall(t *testing.T) {
	testenv.RequireRoot(t)
	for _, b := range backends {
		t.Run(string(b), func(t *testing.T) {
			n := nstest.New(t, "rd")
			spec := DefaultSpec()
			if _, err := Install(context.Background(), n, b, spec); err != nil {
				t.Fatal(err)
			}
			setIPv6(t, n, false)
			if err := Verify(context.Background(), n, spec); err != nil {
				t.Errorf("Verify after IPv6 went off in the pod: %v", err)
			}
			var c Checked
			for i := 0; i < 3; i++ { // the full checks, then the trusted one
				if err := Recheck(context.Background(), n, spec, &c); err != nil {
					t.Errorf("Recheck %d after IPv6 went off in the pod: %v", i, err)
				}
			}
			// A repeated install (a repair, a repeated ADD) is as good.
			if _, err := Install(context.Background(), n, b, spec); err != nil {
				t.Fatal(err)
			}
			if err := Verify(context.Background(), n, spec); err != nil {
				t.Errorf("Verify after a second install: %v", err)
			}

			setIPv6(t, n, true)
			// lo's ::1 comes back at once (no DAD on lo).
			if err := Verify(context.Background(), n, spec); err == nil {
				t.Error("Verify after IPv6 came back: nil, want the IPv6 policy routing missing")
			} else {
				t.Logf("Verify after IPv6 came back: %v", err)
			}
			if _, err := Install(context.Background(), n, b, spec); err != nil {
				t.Fatal(err)
			}
			if err := Verify(context.Background(), n, spec); err != nil {
				t.Errorf("Verify after the repair: %v", err)
			}
			if p := routesVerify(n, spec); len(p) != 0 {
				t.Errorf("routes after the repair: %v", p)
			}
		})
	}
}
