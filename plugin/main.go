package main

import (
	"context"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/ambit-mesh/ambit/plugin/cniproto"
	"github.com/ambit-mesh/ambit/plugin/redirectspec"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"golang.org/x/sys/unix"
)

func main() {
	d := &dispatcher{getenv: os.Getenv, stdin: os.Stdin, stdout: os.Stdout, stderr: os.Stderr}
	if e := d.run(cniFuncs{Add: cmdAdd, Del: cmdDel, Check: cmdCheck, GC: cmdGC, Status: cmdStatus}); e != nil {
		// The error result on stdout (skel's, plus cniVersion), exit
		// status 1.
		if err := d.printError(e); err != nil {
			log.Print("Error writing error JSON to stdout: ", err)
		}
		os.Exit(1)
	}
}

// run wraps one command: config, logger, CNI_ARGS, and a log line with
// the outcome and duration.
type run struct {
	cfg   *Config
	log   *slog.Logger
	pod   podArgs
	args  *cmdArgs
	start time.Time
}

func begin(cmd string, args *cmdArgs) (*run, func(*error), error) {
	parse := parseConfig
	if cmd == "DEL" {
		parse = parseConfigForDel
	}
	cfg, err := parse(args.StdinData)
	if err != nil {
		slog.New(slog.NewTextHandler(os.Stderr, nil)).Error("rejecting config", "cmd", cmd, "err", err)
		return nil, nil, err
	}
	log, closeLog := newLogger(cfg)
	log = log.With("cmd", cmd, "containerID", args.ContainerID)
	if len(cfg.Unknown) > 0 {
		log.Warn("ignoring unknown config keys (typo?)", "keys", cfg.Unknown)
	}
	if len(cfg.OtherCase) > 0 {
		log.Warn("config keys in another case are applied; write them as documented", "keys", cfg.OtherCase)
	}
	if cfg.PrevResultErr != nil {
		log.Warn("ignoring a prevResult that cannot be read; DEL does not need it", "err", cfg.PrevResultErr)
	}
	pod, err := parseCNIArgs(args.Args)
	if err != nil && cmd == "DEL" {
		// The runtime calls DEL after an ADD that failed on these very
		// arguments; failing it too would wedge the sandbox's teardown.
		// Nothing was enrolled with arguments ADD refuses.
		log.Warn("CNI_ARGS cannot be read; nothing was enrolled with them, so there is nothing to delete", "err", err)
		pod, err = podArgs{}, nil
	}
	if err != nil {
		log.Error("rejecting CNI_ARGS", "err", err)
		closeLog()
		return nil, nil, err
	}
	if pod.nameOnly && cfg.DefaultNamespace != "" {
		pod.Namespace, pod.fromKubelet = cfg.DefaultNamespace, true
		if pod.UID == "" {
			// No pod UID outside Kubernetes: the sandbox is the unit.
			pod.UID = args.ContainerID
		}
	}
	if pod.fromKubelet {
		log = log.With("pod", pod.Namespace+"/"+pod.Name)
	}
	r := &run{cfg: cfg, log: log, pod: pod, args: args, start: time.Now()}
	end := func(errp *error) {
		if *errp != nil {
			log.Error("failed", "err", *errp, "took", time.Since(r.start))
		} else {
			log.Debug("done", "took", time.Since(r.start))
		}
		closeLog()
	}
	return r, end, nil
}

func (r *run) request(op cniproto.Op) *cniproto.Request {
	var backend redirectspec.Backend
	if r.cfg.RuleBackend != redirectspec.Auto && op != cniproto.OpDel {
		backend = r.cfg.RuleBackend
	}
	return &cniproto.Request{Version: cniproto.Version, Op: op, RuleBackend: backend, Network: r.network(), Pod: cniproto.Pod{
		Namespace: r.pod.Namespace, Name: r.pod.Name, UID: r.pod.UID,
		ContainerID: r.args.ContainerID, Netns: r.args.Netns, IfName: r.args.IfName,
		IPs: prevIPs(r.cfg.PrevResult),
	}}
}

// network is the conflist's name when it is one the CNI spec allows
// (libcni refuses others before running a plugin for ADD, CHECK and
// DEL; the dispatcher refuses them too), else "" (a name longer than
// cniproto.MaxNetworkName): the agent then knows the attachment's
// network as it knows one of an older plugin's, not at all, and keeps it
// from any network's GC (cmdGC refuses a GC under a name it cannot send).
func (r *run) network() string {
	if cniproto.CheckNetworkName(r.cfg.Name) != nil {
		return ""
	}
	return r.cfg.Name
}

func prevIPs(res types.Result) []netip.Prefix {
	if res == nil {
		return nil
	}
	cur, err := current.NewResultFromResult(res)
	if err != nil {
		return nil
	}
	var out []netip.Prefix
	for _, ip := range cur.IPs {
		a, ok := netip.AddrFromSlice(ip.Address.IP)
		if !ok {
			continue
		}
		ones, _ := ip.Address.Mask.Size()
		out = append(out, netip.PrefixFrom(a.Unmap(), ones))
		if len(out) == 16 {
			break
		}
	}
	return out
}

// call talks to the agent and maps transport failures to CNI errors;
// unavailable is reported separately because policy decides what it
// means.
//
// An agent older than this plugin (a rollback, or an upgrade before the
// new agent replaced the binary on disk) refuses version 3; add, del and
// check are asked again in version 2, without the network's name, which
// such an agent has no use for. A gc is not (see cmdGC).
func (r *run) call(req *cniproto.Request, netns *os.File) (resp *cniproto.Response, unavailable error, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), r.cfg.AgentTimeout)
	defer cancel()
	resp, err = cniproto.Call(ctx, r.cfg.AgentSocket, req, netns)
	if err == nil && req.Op != cniproto.OpGC && req.Version > 2 && cniproto.AgentOlder(req, resp) {
		r.log.Info("ambit-agent is older than ambit-cni; asking again in protocol version 2", "agentVersion", resp.Version, "refusal", resp.Error)
		old := *req
		old.Version, old.Network = 2, ""
		resp, err = cniproto.Call(ctx, r.cfg.AgentSocket, &old, netns)
	}
	switch {
	case err == nil:
		return resp, nil, nil
	case errors.Is(err, cniproto.ErrAgentUnavailable):
		return nil, err, nil
	case errors.Is(err, context.DeadlineExceeded):
		return nil, nil, types.NewError(types.ErrTryAgainLater,
			fmt.Sprintf("ambit-agent did not answer within %s (agentTimeout); kubelet will retry", r.cfg.AgentTimeout), err.Error())
	default:
		return nil, nil, types.NewError(cniproto.CodeProtocol, "exchange with ambit-agent failed: "+err.Error(), "")
	}
}

// agentError turns an agent's error answer into a CNI error: the agent's
// code when it set one (the redirection failed to install, CHECK found it
// different), else "try again later" or "refused".
func agentError(resp *cniproto.Response) error {
	code := cniproto.CodeRefused
	switch {
	case resp.Code != 0:
		code = resp.Code
	case resp.Retryable:
		code = types.ErrTryAgainLater
	}
	msg := resp.Error
	if !strings.HasPrefix(msg, "ambit-agent") {
		msg = "ambit-agent: " + msg
	}
	return types.NewError(code, msg, "")
}

// agentDown decides what an unreachable agent means for this pod; nil
// lets the pod proceed unenrolled.
func (r *run) agentDown(cause error) error {
	who := r.pod.Namespace + "/" + r.pod.Name
	if r.cfg.AgentDownPolicy == policyFailClosed {
		return types.NewError(types.ErrTryAgainLater,
			fmt.Sprintf("ambit-agent is down and agentDownPolicy is fail-closed: pod %s waits for it (is the ambit-agent pod running on this node?)", who), cause.Error())
	}
	snap, err := cniproto.ReadSnapshot(r.cfg.SnapshotFile)
	if err != nil {
		return types.NewError(types.ErrTryAgainLater,
			fmt.Sprintf("ambit-agent is down and its enrollment snapshot is unusable (%v): failing closed for pod %s until the agent is back", err, who), cause.Error())
	}
	switch v := snap.Verdict(r.pod.Namespace); v {
	case cniproto.MayEnroll:
		return types.NewError(types.ErrTryAgainLater,
			fmt.Sprintf("ambit-agent is down and pod %s needs it: namespace %s is enrolled in the mesh (or has opted-in pods); kubelet will retry once the agent is back", who, r.pod.Namespace), cause.Error())
	default:
		r.log.Warn("ambit-agent is down; starting pod unenrolled, as the enrollment snapshot says its namespace is not in the mesh",
			"verdict", v.String(), "snapshotGenerated", snap.Generated, "cause", cause.Error())
		return nil
	}
}

// openNetns opens the runtime's netns path to send its fd to the agent,
// after checking that it is a network namespace (nsfs), so a wrong path
// fails here with the spec's code rather than in the agent.
func openNetns(path string) (*os.File, error) {
	if path == "" {
		return nil, types.NewError(types.ErrInvalidNetNS, "CNI_NETNS is empty", "")
	}
	// O_NONBLOCK: opening a FIFO (or a device) waits for its peer, and
	// the plugin hung there, DEL too; a namespace file opens at once
	// either way. The flag is cleared before the fd goes anywhere.
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, types.NewError(types.ErrInvalidNetNS, fmt.Sprintf("cannot open the pod netns %s: %v", path, &os.PathError{Op: "open", Path: path, Err: err}), "")
	}
	if err := unix.SetNonblock(fd, false); err != nil {
		unix.Close(fd)
		return nil, types.NewError(types.ErrInvalidNetNS, fmt.Sprintf("pod netns %s: %v", path, err), "")
	}
	f := os.NewFile(uintptr(fd), path)
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(f.Fd()), &st); err != nil {
		f.Close()
		return nil, types.NewError(types.ErrInvalidNetNS, fmt.Sprintf("pod netns %s: statfs: %v", path, err), "")
	}
	if st.Type != unix.NSFS_MAGIC {
		f.Close()
		return nil, types.NewError(types.ErrInvalidNetNS, fmt.Sprintf("pod netns %s is not a namespace (filesystem magic %#x, want nsfs)", path, st.Type), "")
	}
	// nsfs holds every kind of namespace: a pid or mount namespace path
	// must fail here, with the spec's code, not in the agent's setns.
	if t, err := unix.IoctlRetInt(int(f.Fd()), unix.NS_GET_NSTYPE); err != nil || t != unix.CLONE_NEWNET {
		f.Close()
		return nil, types.NewError(types.ErrInvalidNetNS, fmt.Sprintf("pod netns %s is not a network namespace", path), "")
	}
	return f, nil
}

// printPrev prints prevResult as ADD's result: ambit-cni changes nothing
// a result describes, so the spec wants prevResult back. The bytes the
// runtime sent, when they are in the configuration's version: the result
// types would drop every field they do not know (another plugin's, a
// newer spec's) and re-encode the rest.
func (r *run) printPrev() error {
	if r.cfg.prevJSON != nil {
		_, err := os.Stdout.Write(r.cfg.prevJSON)
		return err
	}
	return types.PrintResult(r.cfg.PrevResult, r.cfg.CNIVersion)
}

func cmdAdd(args *cmdArgs) (err error) {
	r, end, err := begin("ADD", args)
	if err != nil {
		return err
	}
	defer end(&err)
	if r.cfg.PrevResult == nil {
		return types.NewError(types.ErrInvalidNetworkConfig, "ambit-cni must be chained after the primary CNI plugin: ADD came without prevResult", "")
	}
	if !r.pod.fromKubelet {
		r.log.Info("no Kubernetes pod identity in CNI_ARGS; leaving the container unenrolled")
		return r.printPrev()
	}
	if r.cfg.excluded(r.pod.Namespace) {
		r.log.Debug("namespace excluded; not enrolled")
		return r.printPrev()
	}
	f, err := openNetns(args.Netns)
	if err != nil {
		return err
	}
	defer f.Close()

	resp, unavailable, err := r.call(r.request(cniproto.OpAdd), f)
	if err != nil {
		return err
	}
	if unavailable != nil {
		if err := r.agentDown(unavailable); err != nil {
			return err
		}
		return r.printPrev()
	}
	if resp.Error != "" {
		return agentError(resp)
	}
	if resp.Decision == cniproto.Skip {
		r.log.Debug("agent: not enrolled")
		return r.printPrev()
	}
	// The agent installed the redirection before answering (protocol
	// version 2): the app's first packet is captured.
	r.log.Info("enrolled", "took", time.Since(r.start))
	return r.printPrev()
}

func cmdDel(args *cmdArgs) (err error) {
	r, end, err := begin("DEL", args)
	if err != nil {
		return err
	}
	defer end(&err)
	if !r.pod.fromKubelet {
		return nil
	}
	// Excluded namespaces are not skipped: the exclusion may have been
	// added since ADD (the conflist changed while the pod ran), and the
	// agent, which knows what it enrolled, holds the pod's listeners —
	// and with them its netns — until told. The agent removes the
	// redirection from the netns while it exists; the runtime may
	// already have removed it, and the rules with it.
	var f *os.File
	if args.Netns != "" {
		if f, err = openNetns(args.Netns); err != nil {
			r.log.Debug("netns already gone", "netns", args.Netns, "err", err)
			f = nil
		} else {
			defer f.Close()
		}
	}
	resp, unavailable, err := r.call(r.request(cniproto.OpDel), f)
	switch {
	case unavailable != nil:
		// The agent forgets pods that vanished while it was down when
		// it reconciles on start; DEL must not wedge teardown. The
		// redirection, if any, goes with the netns the runtime is about
		// to remove.
		r.log.Warn("ambit-agent unreachable; it will notice the pod is gone when it is back, and the netns's redirection goes with the netns", "err", unavailable)
		return nil
	case err != nil:
		r.log.Warn("ambit-agent did not confirm the delete", "err", err)
		return nil
	case resp.Error != "":
		return agentError(resp)
	}
	return nil
}

func cmdCheck(args *cmdArgs) (err error) {
	r, end, err := begin("CHECK", args)
	if err != nil {
		return err
	}
	defer end(&err)
	if r.cfg.PrevResult == nil {
		return types.NewError(types.ErrInvalidNetworkConfig, "ambit-cni must be chained after the primary CNI plugin: CHECK came without prevResult", "")
	}
	if !r.pod.fromKubelet || r.cfg.excluded(r.pod.Namespace) {
		return nil
	}
	f, err := openNetns(args.Netns)
	if err != nil {
		return err
	}
	defer f.Close()
	// The agent verifies the rules in the netns (enrolled: as it
	// installed them; skipped: none of ours) and answers CodeCheck when
	// they differ.
	resp, unavailable, err := r.call(r.request(cniproto.OpCheck), f)
	if err != nil {
		return err
	}
	if unavailable != nil {
		return r.agentDown(unavailable)
	}
	if resp.Error != "" {
		return agentError(resp)
	}
	return nil
}

func cmdGC(args *cmdArgs) (err error) {
	r, end, err := begin("GC", args)
	if err != nil {
		return err
	}
	defer end(&err)
	// Checked here, not only in Call, so the error says what to do: the
	// list is all-or-nothing (a partial one would make the agent forget
	// pods still running), so GC is refused and nothing is forgotten.
	if n := len(r.cfg.ValidAttachments); n > cniproto.MaxAttachments {
		return types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("the runtime lists %d valid attachments; ambit-cni's GC handles at most %d per node, so nothing was collected and no pod was affected", n, cniproto.MaxAttachments), "")
	}
	// The list is this network's attachments only (CNI 1.1: the runtime
	// GCs each network configuration on its own; CRI-O and Multus 4.2+
	// do), so it goes with the network's name and the agent forgets only
	// what it knows to be of this network. Sent without one, the agent
	// takes the list for the node's whole and forgets every sandbox of
	// the other networks. A name the protocol cannot carry is refused
	// rather than dropped, for that reason (the dispatcher already
	// refused a missing name or one with characters CNI does not allow;
	// what is left is the protocol's length bound).
	if err := cniproto.CheckNetworkName(r.cfg.Name); err != nil {
		return configError("name", "%v: nothing was collected and no pod was affected", err)
	}
	req := &cniproto.Request{Version: cniproto.NetworkVersion, Op: cniproto.OpGC, Network: r.cfg.Name, Valid: make([]cniproto.Attachment, 0, len(r.cfg.ValidAttachments))}
	for _, a := range r.cfg.ValidAttachments {
		req.Valid = append(req.Valid, cniproto.Attachment{ContainerID: a.ContainerID, IfName: a.IfName})
	}
	resp, unavailable, err := r.call(req, nil)
	switch {
	case unavailable != nil:
		r.log.Info("ambit-agent unreachable; nothing to collect until it is back", "err", unavailable)
		return nil
	case err != nil:
		return err
	case cniproto.AgentOlder(req, resp):
		// Not asked again without the name: an older agent would take
		// this network's list for the node's and forget the pods of
		// every other network. Nothing is collected until the agent is
		// upgraded; it still forgets pods deleted from the API when it
		// reconciles, and DEL works as before.
		return types.NewError(cniproto.CodeRefused, fmt.Sprintf("ambit-agent refused the GC of network %q: %s. It speaks protocol version %d, older than this ambit-cni's %d, and cannot tell this network's attachments from the node's, "+
			"so nothing was collected and no pod was affected (agent and plugin versions differ; upgrade ambit-agent). Harmless meanwhile: the runtime retries GC, and ADD, CHECK and DEL are unaffected",
			req.Network, strings.TrimPrefix(resp.Error, "ambit-agent: "), resp.Version, cniproto.Version), "")
	case resp.Error != "":
		return agentError(resp)
	}
	return nil
}

// cmdStatus reports whether ADD can be served. With the snapshot policy
// it can, agent or not (pods that need the agent fail individually), so
// an agent outage never marks the node's network not-ready. With
// fail-closed, a missing agent socket makes the plugin unavailable.
func cmdStatus(args *cmdArgs) (err error) {
	r, end, err := begin("STATUS", args)
	if err != nil {
		return err
	}
	defer end(&err)
	if r.cfg.AgentDownPolicy != policyFailClosed {
		return nil
	}
	// A connection, not a stat: an agent killed with -9 leaves its
	// socket file behind, and ADD then fails while a stat said ready.
	if perr := cniproto.Probe(r.cfg.AgentSocket, min(r.cfg.AgentTimeout, 2*time.Second)); perr != nil {
		return types.NewError(types.ErrPluginNotAvailable, fmt.Sprintf("ambit-agent does not accept connections on its socket %s and agentDownPolicy is fail-closed", r.cfg.AgentSocket), perr.Error())
	}
	return nil
}
