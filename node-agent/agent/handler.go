package agent

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/node-agent/netnsfind"
	"github.com/ambit-mesh/ambit/node-agent/state"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
	"github.com/ambit-mesh/ambit/plugin/redirect"
)

// foundPrefix marks records of pods the agent found by itself (live
// enrollment of a pod it never saw at ADD): their container ID is unknown
// until DEL, which then matches by pod name and netns (isSandbox).
const foundPrefix = "found:"

// handle serves one plugin request.
func (a *Agent) handle(ctx context.Context, req *cniproto.Request, f *os.File) *cniproto.Response {
	done := a.live.startRequest(req)
	switch req.Op {
	case cniproto.OpDel:
		return a.detachable(ctx, req, done, func() *cniproto.Response { return a.delWithRules(req, f) })
	case cniproto.OpGC:
		if f != nil {
			f.Close()
		}
		return a.detachable(ctx, req, done, func() *cniproto.Response { return a.gc(req) })
	}
	defer done()
	var resp *cniproto.Response
	switch req.Op {
	case cniproto.OpAdd:
		resp = a.add(ctx, req, f, false)
	case cniproto.OpCheck:
		resp = a.add(ctx, req, f, true)
	default:
		if f != nil {
			f.Close()
		}
		resp = &cniproto.Response{Error: "unsupported op " + string(req.Op)}
	}
	a.countRequest(req, resp)
	return resp
}

func (a *Agent) countRequest(req *cniproto.Request, resp *cniproto.Response) {
	result := string(resp.Decision)
	if resp.Error != "" {
		result = "error"
	}
	a.m.requests.WithLabelValues(string(req.Op), result).Inc()
}

func errResp(retry bool, format string, args ...any) *cniproto.Response {
	return &cniproto.Response{Error: sprintf(format, args...), Retryable: retry}
}

func prefixAddrs(ps []netip.Prefix) []netip.Addr {
	out := make([]netip.Addr, 0, len(ps))
	for _, p := range ps {
		out = append(out, p.Addr().Unmap())
	}
	return out
}

// add serves ADD and CHECK: decide, and if the pod is enrolled, serve it
// (CHECK re-adopts a pod it does not serve, since it carries the fd).
func (a *Agent) add(ctx context.Context, req *cniproto.Request, f *os.File, check bool) *cniproto.Response {
	start := time.Now()
	kept := false
	defer func() {
		if !kept && f != nil {
			f.Close()
		}
	}()
	rp := req.Pod
	unlock, err := a.lockCtx(ctx, rp.Namespace, rp.Name)
	if err != nil {
		a.m.failures.WithLabelValues("lock-wait").Inc()
		return errResp(true, "ambit-agent: pod %s/%s: its lock is held by another operation (on it or on a pod sharing its lock stripe) past this request's deadline; retry", rp.Namespace, rp.Name)
	}
	defer unlock()

	ips := prefixAddrs(rp.IPs)
	other := a.otherAttachment(rp)
	if l, ok := a.view.(Learner); ok && !check && len(ips) > 0 && other == "" {
		// Another attachment's ADD (Multus' net1) brings that
		// interface's addresses: learned, they replaced the pod's
		// eth0 address, the one its peers reach, in the directory.
		l.Learn(rp.Namespace, rp.Name, rp.UID, ips)
	}
	cp, found, err := a.view.Pod(ctx, rp.Namespace, rp.Name)
	if err != nil {
		a.m.failures.WithLabelValues("lookup").Inc()
		return errResp(true, "ambit-agent: looking up pod %s/%s: %v", rp.Namespace, rp.Name, err)
	}
	if !found {
		if a.static {
			resp, _ := a.rulesAnswer(ctx, req, f, check, nil)
			return resp
		}
		a.m.failures.WithLabelValues("unknown-pod").Inc()
		return errResp(true, "ambit-agent: pod %s/%s is not known yet (cache warming or pod just created); retry", rp.Namespace, rp.Name)
	}
	if rp.UID != "" && cp.UID != "" && !cp.SandboxUID(rp.UID) {
		// The view is behind the runtime: decided on the pod it
		// holds, everything below would carry the previous pod's UID.
		var resp *cniproto.Response
		if cp, resp = a.podOfSandbox(ctx, rp, cp); resp != nil {
			return resp
		}
	}
	if cp.UID == "" {
		cp.UID = rp.UID
	}
	if len(cp.IPs) == 0 {
		cp.IPs = ips
	}
	if len(ips) == 0 {
		ips = cp.IPs
	}
	if cp.NodeName != "" && cp.NodeName != a.cfg.NodeName {
		return errResp(false, "ambit-agent: pod %s/%s is scheduled on node %q, this agent serves %q", rp.Namespace, rp.Name, cp.NodeName, a.cfg.NodeName)
	}
	var nsp *cluster.Namespace
	if n, ok := a.view.Namespace(rp.Namespace); ok {
		nsp = &n
	}
	d := a.policy.Decide(cp, nsp)
	if d.Enroll {
		if err := a.declaredConflict(cp); err != nil {
			a.m.failures.WithLabelValues(reasonOf(err)).Inc()
			a.setStatus(cp, "failed", eventReason(err), message(err))
			a.log.Warn("enrollment refused", "pod", rp.Namespace+"/"+rp.Name, "err", err)
			return codeResp(cniproto.CodePortConflict, "ambit-agent: %s", message(err))
		}
	}

	a.mu.Lock()
	// A container ID is one sandbox of one pod: existing is rp's, its
	// serving and record guarded by the lock held.
	existing := a.byCID[rp.ContainerID]
	a.mu.Unlock()
	if existing != nil && existing.enrolled() {
		if d.Enroll && (check || sameNetns(existing, f)) {
			// Repeated ADD of the same sandbox or CHECK: still served;
			// the rules are installed again (idempotent) or verified.
			// In the netns file the agent serves the pod with when the
			// request's is the same namespace: status shows the looks
			// taken on that file (watchedRules), and one taken on the
			// request's, closed once answered, would be lost.
			nf := f
			if sameNetns(existing, f) {
				nf = existing.netns
			}
			spec := existing.spec
			resp, backend := a.rulesAnswer(ctx, req, nf, check, &spec)
			if check && req.Version >= 2 && resp.Error == "" && existing.rec.Backend == "" {
				// Verified, and the record names no engine (one
				// written before CHECK re-adoption recorded it).
				backend = a.rulesBackend(ctx, nf)
			}
			rec := existing.rec
			dirty := false
			if backend != "" && backend != rec.Backend {
				// The install may have switched engines (the
				// conflist's backend changed): the record says which
				// holds the rules after a restart too.
				rec.Backend, dirty = backend, true
			}
			if nets := addNetwork(rec.Networks, req.Network, ownAttachment(rec, rp)); !slices.Equal(nets, rec.Networks) {
				// Another attachment's ADD (net1, through a
				// NetworkAttachmentDefinition's chain), or the own
				// one's network learned: that network's GC must now
				// list the sandbox before the agent forgets it, and
				// another network's cannot.
				rec.Networks, dirty = nets, true
			}
			if dirty {
				a.setRec(existing, func(r *state.Pod) { *r = rec })
				a.rewrite(rec)
			}
			return resp
		}
		a.releaseAsync(existing)
	}
	ifName := rp.IfName
	if other != "" && existing != nil && sameNetns(existing, f) {
		// Another attachment's ADD or CHECK (net1) of a sandbox
		// recorded unserved (not enrolled at eth0's ADD): the record
		// stays eth0's. Made net1's, the pod labelled later was served
		// by it, and the DEL of net1 released the sandbox while eth0 ran
		// on; re-adopted, its IPs were learned as the pod's.
		ifName = other
		if len(existing.rec.IPs) > 0 {
			ips = existing.rec.IPs
		}
	}
	nets := addNetwork(nil, req.Network, true)
	if existing != nil {
		// The same sandbox (container ID): the networks it was known
		// in stay, or the GC of the one not named here would forget it.
		nets = addNetwork(existing.rec.Networks, req.Network, ownAttachment(existing.rec, rp))
	}
	ino, _ := netnsfind.Inode(f)
	p := &pod{rec: state.Pod{
		Namespace: rp.Namespace, Name: rp.Name, UID: cp.UID, ContainerID: rp.ContainerID, IfName: ifName,
		Networks: nets, Netns: rp.Netns, NetnsInode: ino, IPs: ips, Since: time.Now().UTC(),
	}}
	if !d.Enroll {
		// Remember where the pod lives so a later label enrolls it fast.
		if err := a.store.Put(p.rec); err != nil {
			a.log.Warn("persisting pod record", "pod", rp.Namespace+"/"+rp.Name, "err", err)
		}
		takeDrains(p, existing)
		a.register(p)
		a.supersedeFound(p)
		a.dropKeptLocked(rp.Namespace, rp.Name, cp, true)
		a.log.Debug("pod not enrolled", "pod", rp.Namespace+"/"+rp.Name, "reason", d.Reason)
		resp, _ := a.rulesAnswer(ctx, req, f, check, nil)
		return resp
	}
	spec := a.specFor(ips, f)
	wl := a.workload(cp)
	// The tunnel knows the pod by the record's IPs, the sandbox's own
	// (the request's, else the view's), as the host entries do: the
	// view's may still name a previous sandbox's, given since to
	// another pod, and the tunnel reset traffic to the pod's real IP as
	// another pod's (TestAddServesTheSandboxsIPs).
	wl.IPs = slices.Clone(p.rec.IPs)
	p.spec = spec
	p.rec.Identity, p.rec.IPv4, p.rec.IPv6 = wl.Identity, spec.IPv4, spec.IPv6
	if err := a.serve(p, f, wl, true); err != nil {
		a.m.failures.WithLabelValues(reasonOf(err)).Inc()
		a.setStatus(cp, "failed", eventReason(err), message(err))
		a.log.Warn("enrollment failed", "pod", rp.Namespace+"/"+rp.Name, "err", err)
		if reasonOf(err) == reasonPortInUse {
			return codeResp(cniproto.CodePortConflict, "ambit-agent: %s", message(err))
		}
		return errResp(false, "ambit-agent: enrolling %s/%s: %v", rp.Namespace, rp.Name, err)
	}
	kept = true
	if err := a.addHostRules(ctx, p); err != nil {
		// Out of time (the host's xtables lock, iptables host
		// rules): as for the pod's own rules below.
		a.releaseAsync(p)
		a.m.failures.WithLabelValues("rules-deadline").Inc()
		a.log.Warn("enrollment not done by the request's deadline; the runtime retries", "pod", rp.Namespace+"/"+rp.Name, "err", err)
		return errResp(true, "ambit-agent: pod %s/%s: adding its probe SNAT entry to the host's rules did not finish by this request's deadline; retry: %v", rp.Namespace, rp.Name, err)
	}
	if req.Version >= 2 && !check {
		// Listeners first, then the rules that send traffic to them.
		resp, backend := a.rulesAnswer(ctx, req, f, false, &spec)
		if resp.Error != "" {
			a.releaseAsync(p)
			if resp.Retryable {
				// Out of time (the host's xtables lock): the runtime
				// retries with a new sandbox; nothing to announce.
				a.m.failures.WithLabelValues("rules-deadline").Inc()
				a.log.Warn("enrollment not done by the request's deadline; the runtime retries", "pod", rp.Namespace+"/"+rp.Name, "err", resp.Error)
				return resp
			}
			a.m.failures.WithLabelValues("redirect").Inc()
			a.setStatus(cp, "failed", "EnrollmentFailed", resp.Error)
			a.log.Warn("enrollment failed", "pod", rp.Namespace+"/"+rp.Name, "err", resp.Error)
			return resp
		}
		// Recorded, so status still names the rule engine after a
		// restart (before, only live enrollment and repairs set it).
		p.rec.Backend = backend
	}
	if req.Version >= 2 && check {
		// A CHECK re-adopts a pod whose rules are in already (verified
		// below): recorded as an install's engine is, so status names
		// it; before, `-` until a repair.
		p.rec.Backend = a.rulesBackend(ctx, f)
	}
	p.rec.Enrolled = true
	if err := a.store.Put(p.rec); err != nil {
		// Served anyway; after a restart the full reconcile finds it.
		a.log.Warn("persisting pod record", "pod", rp.Namespace+"/"+rp.Name, "err", err)
	}
	takeDrains(p, existing)
	a.register(p)
	a.supersedeFound(p)
	a.dropKeptLocked(rp.Namespace, rp.Name, cp, true)
	a.m.latency.WithLabelValues("add").Observe(time.Since(start).Seconds())
	a.setStatus(cp, "enabled", "", "")
	a.log.Info("pod enrolled", "pod", rp.Namespace+"/"+rp.Name, "identity", wl.Identity, "reason", d.Reason, "ipv4", spec.IPv4, "ipv6", spec.IPv6, "took", time.Since(start).Round(time.Microsecond))
	if check {
		resp, _ := a.rulesAnswer(ctx, req, f, true, &spec)
		return resp
	}
	return &cniproto.Response{Decision: cniproto.Enroll, Redirect: &spec}
}

// rulesAnswer does a version 2 request's netns work and answers: spec
// nil means the pod is not enrolled. It also returns the backend an
// install used ("" when it installed nothing). ADD installs spec (idempotent,
// atomic: on failure nothing of ours is left), CHECK verifies spec or,
// for a pod not enrolled, that none of our rules are there. A version 1
// plugin does this itself and gets the bare decision.
//
// The work ends answerMargin before the request's deadline: an iptables
// run waiting on the host's xtables lock (one file for every netns of
// the node, which kube-proxy or a CNI may hold for seconds) is cut, what
// it left is removed, and the plugin gets a retryable error naming the
// wait, in time, instead of no answer.
func (a *Agent) rulesAnswer(ctx context.Context, req *cniproto.Request, f *os.File, check bool, spec *redirect.Spec) (*cniproto.Response, string) {
	who := req.Pod.Namespace + "/" + req.Pod.Name
	skip := &cniproto.Response{Decision: cniproto.Skip}
	if req.Version < 2 {
		if spec == nil {
			return skip, ""
		}
		return &cniproto.Response{Decision: cniproto.Enroll, Redirect: spec}, ""
	}
	if spec == nil && !check {
		return skip, ""
	}
	ctx, cancel := a.beforeAnswerDue(ctx)
	defer cancel()
	var backend string
	switch {
	case spec == nil:
		found, err := a.rules.Installed(ctx, f)
		if outOfTime(err) {
			return errResp(true, "ambit-agent: pod %s: reading its rules did not finish by this request's deadline; retry: %v", who, err), ""
		}
		if err != nil {
			return codeResp(cniproto.CodeIO, "ambit-agent: reading the rules of pod %s: %v", who, err), ""
		}
		if len(found) > 0 {
			return codeResp(cniproto.CodeCheck, "ambit-agent: pod %s is not enrolled but its netns holds %v redirection rules", who, found), ""
		}
		return skip, ""
	case check:
		err := a.rules.Verify(ctx, f, *spec)
		if outOfTime(err) {
			return errResp(true, "ambit-agent: pod %s: checking its redirection did not finish by this request's deadline; retry: %v", who, err), ""
		}
		if err != nil {
			return codeResp(cniproto.CodeCheck, "ambit-agent: pod %s: %v", who, err), ""
		}
	default:
		var err error
		backend, err = a.rules.Install(ctx, f, req.RuleBackend, *spec)
		if outOfTime(err) {
			return errResp(true, "ambit-agent: pod %s: installing its redirection did not finish by this request's deadline; retry: %v", who, err), ""
		}
		if err != nil {
			return codeResp(cniproto.CodeRedirect, "ambit-agent: installing the redirection for pod %s: %v", who, err), ""
		}
		a.log.Debug("redirection installed", "pod", who, "backend", backend)
	}
	return &cniproto.Response{Decision: cniproto.Enroll, Redirect: spec}, backend
}

// addHostRules adds p's IPs to the host's probe SNAT entries (serve
// does it for the agent's own loops), by answerMargin before the
// request's deadline: with the iptables backend a rewrite of the host
// rules waits for the host's xtables lock, each run up to 5 s, which
// would hold the answer past the deadline. Only that end is returned;
// any other error, a run stopped at the tool's own bound among them, is
// logged, as at live enrollment: the reconcile loop repairs the host
// rules, and the pod is served meanwhile.
//
// The IPs are the record's, the sandbox's own (the request's, else the
// view's): what a release after a cut ADD, a DEL and the Sync after a
// restart take back or rewrite. The view's may be stale (an API status
// still naming a previous sandbox's IP, given since to another pod):
// added, that pod's entry changed owner and the cut ADD's release left
// it behind under this pod's UID.
func (a *Agent) addHostRules(ctx context.Context, p *pod) error {
	if a.host == nil || len(p.rec.IPs) == 0 {
		return nil
	}
	ctx, cancel := a.beforeAnswerDue(ctx)
	defer cancel()
	err := a.host.AddContext(ctx, hostKey(p.rec), p.rec.IPs)
	if cutByRequest(ctx, err) {
		return err
	}
	if err != nil {
		a.log.Warn("host probe rules", "pod", p.rec.Namespace+"/"+p.rec.Name, "err", err)
	}
	return nil
}

// rulesBackend names the engine holding f's rules of ours, "" when none
// or several do or the look fails (the CHECK's Verify says what is
// wrong; the rule check's repair records the engine it installs with).
func (a *Agent) rulesBackend(ctx context.Context, f *os.File) string {
	ctx, cancel := a.beforeAnswerDue(ctx)
	defer cancel()
	found, err := a.rules.Installed(ctx, f)
	if err != nil || len(found) != 1 {
		return ""
	}
	return string(found[0])
}

// outOfTime tells an error of rule work cut by a context. An iptables
// run stopped at its own bound is not (redirect.ErrRunTimeout wraps no
// context error): with a requestTimeout above that bound it comes first,
// and it is the rule install failing, answered with the redirect code,
// not "retry" (TestAddRuleRunBoundIsARuleFailure).
func outOfTime(err error) bool {
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled)
}

// cutByRequest tells an error of host-rule work the request's own end
// (ctx, answerMargin before its deadline) stopped: ctx is over. A run
// stopped at its tool's own bound (10 s) is not, whatever its error
// wraps: with a requestTimeout above that bound it comes first, and it
// is the tool's failure, logged like any other.
func cutByRequest(ctx context.Context, err error) bool {
	return ctx.Err() != nil && outOfTime(err)
}

func codeResp(code uint, format string, args ...any) *cniproto.Response {
	return &cniproto.Response{Error: sprintf(format, args...), Code: code}
}

// delWithRules serves DEL: a version 2 request carries the netns while
// it exists, and the redirection is removed from it first (new
// connections then go straight to the app) before the pod is forgotten.
func (a *Agent) delWithRules(req *cniproto.Request, f *os.File) *cniproto.Response {
	if other := a.otherAttachment(req.Pod); other != "" {
		// The rules and listeners are the sandbox's, not an
		// interface's: its attachment that made them still lives.
		if f != nil {
			f.Close()
		}
		a.log.Info("DEL of another attachment of a served sandbox; the sandbox stays as it is", "pod", req.Pod.Namespace+"/"+req.Pod.Name,
			"containerID", req.Pod.ContainerID, "ifName", req.Pod.IfName, "servedFor", other)
		return &cniproto.Response{Decision: cniproto.Skip}
	}
	var uerr error
	var ino uint64
	if f != nil {
		ino, _ = netnsfind.Inode(f)
		// The pod's connections are reset first (releaseGone says
		// why), while its rules still translate them: without the NAT
		// binding, the reset of an app's captured connection leaves
		// from the agent's port (127.0.0.1:15001), which the app's
		// socket does not know, and the app never learns. New
		// connections meanwhile are refused, not sent in plaintext:
		// the pod's network is going.
		// The sandbox is looked up as the release below does, so one
		// found by live enrollment is reset before its rules go too.
		unlock := a.lock(req.Pod.Namespace, req.Pod.Name)
		a.mu.Lock()
		p, _ := a.sandboxOfDelLocked(req.Pod, ino)
		a.mu.Unlock()
		if p != nil {
			a.abortConns(p)
		}
		unlock()
		// Not the request's deadline: a DEL goes on past it
		// (detachable), and a removal cut half-way would leave rules
		// sending the pod's traffic to listeners released below.
		uerr = a.rules.Uninstall(loopCtx, f)
		f.Close()
	}
	unlock := a.lock(req.Pod.Namespace, req.Pod.Name)
	resp := a.forgetNetnsLocked(req, ino, true, true)
	unlock()
	if uerr != nil && resp.Error == "" {
		return codeResp(cniproto.CodeIO, "ambit-agent: removing the redirection of pod %s/%s: %v", req.Pod.Namespace, req.Pod.Name, uerr)
	}
	return resp
}

// otherAttachment names the interface of rp's sandbox that its record
// was made for when rp (an ADD or DEL) is of another one of the sandbox's
// attachments ("" otherwise: the same one, or unknown on either side,
// as with records of agents before IfName, where the DEL goes on as it
// did). Multus runs a chain once per attachment with the same container
// ID; until session 16 the DEL of a second one (net1) removed the
// sandbox's rules and listeners while its eth0 went on running.
func (a *Agent) otherAttachment(rp cniproto.Pod) string {
	a.mu.Lock()
	defer a.mu.Unlock()
	p := a.byCID[rp.ContainerID]
	if p == nil || p.rec.IfName == "" || rp.IfName == "" || p.rec.IfName == rp.IfName {
		return ""
	}
	return p.rec.IfName
}

// takeDrains gives p, registered in place of old (the same container
// ID, nil if none), old's servings still draining: those of old's release
// by this ADD, or of an unenrollment before it. The sandbox's DEL finds
// p only, and must cut them (abortConns): its network is going. Left on
// old, they drained on for drainTimeout past the pod's interface.
func takeDrains(p, old *pod) {
	if old == nil || old == p {
		return
	}
	p.drains, old.drains = append(p.drains, old.drains...), nil
}

func sameNetns(p *pod, f *os.File) bool {
	if f == nil || p.rec.NetnsInode == 0 {
		return false
	}
	ino, err := netnsfind.Inode(f)
	return err == nil && ino == p.rec.NetnsInode
}

func (a *Agent) register(p *pod) {
	a.mu.Lock()
	a.byCID[p.rec.ContainerID] = p
	a.byName[p.rec.Namespace+"/"+p.rec.Name] = p
	a.mu.Unlock()
}

// del forgets a sandbox: its connections reset (releaseGone), its
// listeners closed, record removed. Unknown sandboxes are fine (DEL is
// idempotent).
func (a *Agent) del(req *cniproto.Request) *cniproto.Response {
	unlock := a.lock(req.Pod.Namespace, req.Pod.Name)
	defer unlock()
	return a.delLocked(req)
}

// delLocked is del under the pod's lock. The sandbox's network is going
// (a DEL) or gone (a GC): its connections are reset (releaseGone).
func (a *Agent) delLocked(req *cniproto.Request) *cniproto.Response {
	return a.forgetNetnsLocked(req, 0, true, true)
}

// forgetLocked forgets a sandbox as a DEL does, for a sandbox whose
// network may stay (found twice, superseded, gone from the API before
// its DEL): its connections drain. With records false it leaves the
// pod's records in place.
func (a *Agent) forgetLocked(req *cniproto.Request, records bool) *cniproto.Response {
	return a.forgetNetnsLocked(req, 0, records, false)
}

// forgetNetnsLocked is forgetLocked for a DEL that brought its netns:
// ino is that namespace's inode (0: none came). gone: the sandbox's
// network is going (a DEL, a GC, another agent's DEL), so its
// connections are reset before the answer rather than drained
// (releaseGone).
func (a *Agent) forgetNetnsLocked(req *cniproto.Request, ino uint64, records, gone bool) *cniproto.Response {
	rp := req.Pod
	key := rp.Namespace + "/" + rp.Name
	a.mu.Lock()
	p, kept := a.sandboxOfDelLocked(rp, ino)
	last := true
	var heir *pod
	if p == nil && a.byName[key] != nil {
		// Not this DEL's sandbox, but one of the pod lives on: the
		// inventory keeps the IPs it learned of that one.
		last = false
	}
	if p != nil {
		delete(a.byCID, p.rec.ContainerID)
		if a.byName[key] == p {
			delete(a.byName, key)
		} else if heir = a.byName[key]; heir != nil {
			last = false // a newer sandbox of the same pod lives on
		}
	}
	a.mu.Unlock()
	if records {
		if err := a.store.Delete(rp.ContainerID); err != nil {
			a.log.Warn("removing pod record", "pod", key, "err", err)
		}
	}
	if p != nil {
		if records && p.rec.ContainerID != rp.ContainerID {
			a.store.Delete(p.rec.ContainerID)
		}
		if heir != nil && heir.enrolled() && hostKey(heir.rec) == hostKey(p.rec) {
			// The newer sandbox (served already: a late DEL, or the
			// old sandbox released once the other agent of the node
			// removed its record) has the same host-rule owner, the
			// pod's UID, and may have been given the old one's IP
			// back: the release removes only what the newer one does
			// not hold. (heir is under the same pod lock as p.)
			ips := slices.DeleteFunc(slices.Clone(p.rec.IPs), func(ip netip.Addr) bool {
				return slices.Contains(heir.rec.IPs, ip)
			})
			a.setRec(p, func(r *state.Pod) { r.IPs = ips })
		}
		if gone {
			a.releaseGone(p)
		} else {
			a.releaseAsync(p)
		}
		a.log.Info("pod deleted", "pod", key, "wasEnrolled", p.rec.Enrolled)
	}
	if kept != nil {
		a.log.Info("DEL of an unknown sandbox left the pod's sandbox found by live enrollment served: the DEL does not show it is that one", "pod", key, "containerID", rp.ContainerID, "netns", rp.Netns, "servedNetns", kept.rec.Netns)
	}
	if l, ok := a.view.(Learner); ok && last {
		l.Forget(rp.Namespace, rp.Name, rp.UID)
	}
	if p != nil && last {
		// No sandbox of the pod left: nothing to keep announcing (the
		// pod is being deleted, or a new sandbox's ADD says again).
		// The annotation is left as it is, as before.
		a.forgetStatus(rp.Namespace, rp.Name, p.rec.UID)
	}
	return &cniproto.Response{Decision: cniproto.Skip}
}

// sandboxOfDelLocked is the sandbox a DEL of rp (its netns inode ino, 0:
// none came) is about, nil if none; kept is the pod's sandbox found by
// live enrollment that the DEL does not show it is about. Under a.mu.
func (a *Agent) sandboxOfDelLocked(rp cniproto.Pod, ino uint64) (p, kept *pod) {
	if p = a.byCID[rp.ContainerID]; p != nil {
		return p, nil
	}
	q := a.byName[rp.Namespace+"/"+rp.Name]
	if q == nil || !strings.HasPrefix(q.rec.ContainerID, foundPrefix) {
		return nil, nil
	}
	// A sandbox found by live enrollment has no container ID to match;
	// the pod name alone is not enough, since a DEL of an older sandbox
	// already gone may come after the newer one was found: released,
	// the newer one would keep its rules and lose its listeners
	// (traffic refused).
	if isSandbox(q, rp, ino) {
		return q, nil
	}
	return nil, q
}

// isSandbox tells whether a DEL (pod rp, netns inode ino, 0 if it brought
// none) is about q, a sandbox found by live enrollment. The netns it
// brings decides; without one, the runtime's netns path does, when it
// names the one q was found at (the runtime may have removed that bind
// mount while q's listeners keep the namespace). A DEL that shows
// neither (netns gone and no path, or another pod's UID) is not q's:
// leaving a sandbox served until the API or a later DEL says otherwise
// beats cutting a live pod off.
func isSandbox(q *pod, rp cniproto.Pod, ino uint64) bool {
	if rp.UID != "" && q.rec.UID != "" && rp.UID != q.rec.UID {
		return false
	}
	if ino != 0 && q.rec.NetnsInode != 0 {
		return ino == q.rec.NetnsInode
	}
	return rp.Netns != "" && q.rec.Netns != "" && runPath(rp.Netns) == runPath(q.rec.Netns)
}

// runPath cleans p and spells /var/run as /run (a symlink on hosts with a
// netns directory under it), so two spellings of one path compare equal.
func runPath(p string) string {
	p = filepath.Clean(p)
	if rest, ok := strings.CutPrefix(p, "/var/run/"); ok {
		return "/run/" + rest
	}
	return p
}

// gc forgets sandboxes the runtime no longer knows (CNI GC): a DEL that
// never reached the agent must not keep a netns, listeners and a record
// alive forever. Pods the agent found by itself are left to DEL.
//
// A GC naming its network (req.Network, protocol version 3) lists that
// network's attachments only, and forgets a sandbox only once no network
// it is known in lists it (networks.go). One without (an older plugin)
// is the runtime's whole list, as before.
func (a *Agent) gc(req *cniproto.Request) *cniproto.Response {
	valid := make(map[string]bool, len(req.Valid))
	for _, at := range req.Valid {
		valid[at.ContainerID] = true
	}
	if req.Network != "" {
		return a.gcNetwork(req, valid)
	}
	a.mu.Lock()
	var stale []state.Pod
	for cid, p := range a.byCID {
		if !valid[cid] && !strings.HasPrefix(cid, foundPrefix) {
			stale = append(stale, p.rec)
		}
	}
	a.mu.Unlock()
	for _, r := range stale {
		a.del(&cniproto.Request{Op: cniproto.OpDel, Pod: cniproto.Pod{Namespace: r.Namespace, Name: r.Name, UID: r.UID, ContainerID: r.ContainerID}})
	}
	if len(stale) > 0 {
		a.log.Info("gc: forgot sandboxes the runtime no longer has", "count", len(stale))
	}
	if n := a.gcKept(valid); n > 0 {
		a.log.Info("gc: removed records of sandboxes the runtime no longer has, kept unserved since adoption", "count", n)
	}
	return &cniproto.Response{Decision: cniproto.Skip}
}

// ownAttachment tells whether rp is the attachment rec was made for.
func ownAttachment(rec state.Pod, rp cniproto.Pod) bool {
	return rec.IfName != "" && rec.IfName == rp.IfName
}

// gcNetwork is gc for the attachments of one network (req.Network);
// valid holds the container IDs it lists.
func (a *Agent) gcNetwork(req *cniproto.Request, valid map[string]bool) *cniproto.Response {
	n := req.Network
	attached := make(map[[2]string]bool, len(req.Valid))
	for _, at := range req.Valid {
		attached[[2]string{at.ContainerID, at.IfName}] = true
	}
	// apply is the GC's verdict on rec: its networks after, and gone.
	apply := func(rec state.Pod) ([]string, bool) {
		return gcNetworks(rec.Networks, n, valid[rec.ContainerID], rec.IfName != "" && attached[[2]string{rec.ContainerID, rec.IfName}])
	}
	a.mu.Lock()
	cands := make([]*pod, 0, len(a.byCID))
	for cid, p := range a.byCID {
		if !strings.HasPrefix(cid, foundPrefix) {
			cands = append(cands, p)
		}
	}
	a.mu.Unlock()
	forgot, learned := 0, 0
	for _, p := range cands {
		unlock := a.lockOf(p)
		a.mu.Lock()
		current := a.byCID[p.rec.ContainerID] == p
		a.mu.Unlock()
		if !current {
			// Released or replaced meanwhile (a DEL, an ADD): its
			// fate is no longer this GC's.
			unlock()
			continue
		}
		nets, gone := apply(p.rec)
		switch {
		case gone:
			r := p.rec
			a.delLocked(&cniproto.Request{Op: cniproto.OpDel, Pod: cniproto.Pod{Namespace: r.Namespace, Name: r.Name, UID: r.UID, ContainerID: r.ContainerID}})
			forgot++
		case !slices.Equal(nets, p.rec.Networks):
			a.setRec(p, func(r *state.Pod) { r.Networks = nets })
			a.rewrite(p.rec)
			learned++
		}
		unlock()
	}
	if forgot > 0 || learned > 0 {
		a.log.Info("gc: network's sandboxes", "network", n, "forgot", forgot, "networksUpdated", learned)
	}
	if k := a.gcKeptNetwork(n, apply); k > 0 {
		a.log.Info("gc: removed records of sandboxes the network no longer has, kept unserved since adoption", "network", n, "count", k)
	}
	return &cniproto.Response{Decision: cniproto.Skip}
}
