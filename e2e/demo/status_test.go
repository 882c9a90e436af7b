package main

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/e2e/lab"
	"github.com/ambit-mesh/ambit/node-agent/admin"
)

// The demo's "the agent reports 3 pods enrolled …" ✔ must be able to
// fail: each way the agent's answer could contradict it is caught. (The
// document a live agent gives is held by TestDemo; this runs without
// root.)
func TestStatusCheckCatchesWhatContradictsTheClaim(t *testing.T) {
	now := time.Date(2026, 11, 27, 6, 0, 0, 0, time.UTC)
	d := &demo{pods: map[string]*lab.Pod{}}
	good := func() *admin.Status {
		st := &admin.Status{Version: admin.Version, Agent: admin.Agent{Ready: true, Now: now}}
		for i, name := range []string{"client", "intruder", "server"} {
			ip := netip.AddrFrom4([4]byte{10, 77, 0, byte(3 + i)})
			d.pods[name] = &lab.Pod{Namespace: "shop", Name: name, IP: ip}
			id := "spiffe://cluster.local/ns/shop/sa/" + name
			notAfter := now.Add(24*time.Hour - time.Duration(i)*time.Minute)
			st.Pods = append(st.Pods, admin.Pod{Namespace: "shop", Name: name, IPs: []netip.Addr{ip},
				State: admin.StateEnrolled, Listeners: []uint16{15001, 15006, 15008},
				Rules: &admin.RuleCheck{At: now, Result: admin.RulesOK}, Identity: id, CertNotAfter: notAfter})
			st.Certificates = append(st.Certificates, admin.Certificate{Identity: id, NotAfter: notAfter, Pods: 1})
		}
		return st
	}
	left, problems := d.checkStatus(good())
	if len(problems) > 0 {
		t.Fatalf("a document that matches the demo was refused: %v", problems)
	}
	if got := hm(left); got != "23h58m" {
		t.Errorf("certificates valid for %s, want the shortest, 23h58m", got)
	}

	for _, c := range []struct {
		name, want string
		spoil      func(*admin.Status)
	}{
		{"agent stopping", "not ready", func(st *admin.Status) { st.Agent.Stopping = true }},
		{"outsider listed", "not legacy/outsider", func(st *admin.Status) {
			st.Pods = append([]admin.Pod{{Namespace: "legacy", Name: "outsider", State: admin.StateEnrolled}}, st.Pods...)
		}},
		{"a pod missing", "want shop/client", func(st *admin.Status) { st.Pods = st.Pods[1:] }},
		{"a pod failed", `state "failed"`, func(st *admin.Status) {
			st.Pods[2].State, st.Pods[2].Reason = admin.StateFailed, "EnrollmentFailed"
		}},
		{"another pod's IP", "want its own 10.77.0.3", func(st *admin.Status) {
			st.Pods[0].IPs = []netip.Addr{netip.MustParseAddr("10.77.0.9")}
		}},
		{"rules repaired", "want ok", func(st *admin.Status) { st.Pods[1].Rules.Result = admin.RulesRepaired }},
		{"rules never looked at", "want ok", func(st *admin.Status) { st.Pods[1].Rules = nil }},
		{"a listener missing", "listeners", func(st *admin.Status) { st.Pods[0].Listeners = []uint16{15001, 15008} }},
		{"served as another identity", "identity", func(st *admin.Status) {
			st.Pods[1].Identity = "spiffe://cluster.local/ns/shop/sa/client"
		}},
		{"no certificate yet", "none, or expired", func(st *admin.Status) { st.Pods[2].CertNotAfter = time.Time{} }},
		{"certificate expired", "none, or expired", func(st *admin.Status) { st.Pods[2].CertNotAfter = now.Add(-time.Second) }},
		{"certificate fetches failing", "2 failed fetches", func(st *admin.Status) { st.Certificates[0].Failures = 2 }},
		{"no certificate entry", "no certificate entry", func(st *admin.Status) { st.Certificates = st.Certificates[1:] }},
	} {
		st := good()
		c.spoil(st)
		_, problems := d.checkStatus(st)
		if len(problems) == 0 {
			t.Errorf("%s: the check passed", c.name)
			continue
		}
		if all := strings.Join(problems, "; "); !strings.Contains(all, c.want) {
			t.Errorf("%s: problems %q do not say %q", c.name, all, c.want)
		}
	}
}
