package agent

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/tunnel/podnet"
)

// Failure reasons (metric label, Event reason) of a port the pod and the
// agent both want.
const (
	reasonReservedPort = "reserved-port" // declared in the pod's spec
	reasonPortInUse    = "port-in-use"   // a socket of the pod holds it

	eventReservedPort = "ReservedPortDeclared"
	eventPortInUse    = "ReservedPortInUse"
)

// Failure reason (metric label, Event reason) of a pod whose IPs, as the
// view or its record gives them, are in another pod's network namespace
// (netnsowner.go).
const (
	reasonNetnsOwner = "netns-owner"
	eventNetnsOwner  = "NetnsOfAnotherPod"
)

// reservedPorts lists the agent's listener ports, for messages.
func (a *Agent) reservedPorts() []uint16 {
	return []uint16{a.spec.OutboundPort, a.spec.InboundPort, a.spec.HBONEPort}
}

// waysOut tells the user what to do about a port conflict.
func (a *Agent) waysOut() string {
	ps := a.reservedPorts()
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = strconv.Itoa(int(p))
	}
	return fmt.Sprintf("the mesh listens on %s in every ambient pod: change the pod's port, or opt the pod out of the mesh with the label %s=none",
		strings.Join(s, ", "), a.cfg.EnrollLabel)
}

// declaredConflict is the error for a pod whose spec declares a port the
// agent listens on, nil if it declares none. Checked before anything is
// done for the pod: enrolled, the app would fail to bind
// (CrashLoopBackOff with no word of the mesh); not enrolled, an ambient
// pod would run unmeshed. So the ADD fails, and says why.
func (a *Agent) declaredConflict(cp cluster.Pod) error {
	var hits []string
	for _, d := range cp.ReservedPorts {
		if slices.Contains(a.reservedPorts(), d.Port) {
			hits = append(hits, fmt.Sprintf("containerPort %d (container %q)", d.Port, d.Container))
		}
	}
	if len(hits) == 0 {
		return nil
	}
	return &failure{reasonReservedPort, fmt.Errorf("pod %s/%s declares %s; %s", cp.Namespace, cp.Name, strings.Join(hits, ", "), a.waysOut())}
}

// portInUse explains a listener the pod's own socket holds (a running
// pod enrolled live, an app that bound the port first): which socket,
// which process if the host's /proc tells, and the ways out.
func (a *Agent) portInUse(cp cluster.Pod, err error) error {
	var pe *podnet.PortInUseError
	if !errors.As(err, &pe) {
		return nil
	}
	var who []string
	for _, h := range pe.Holders {
		w := h.Addr.String()
		if proc := socketOwner(a.cfg.ProcRoot, h.Inode); proc != "" {
			w += " by " + proc
		} else {
			w += fmt.Sprintf(" (uid %d)", h.UID)
		}
		who = append(who, w)
	}
	return &failure{reasonPortInUse, fmt.Errorf("pod %s/%s: an application of the pod listens on port %d (%s), which the mesh needs; %s",
		cp.Namespace, cp.Name, pe.Port, strings.Join(who, ", "), a.waysOut())}
}

// message is what the user reads of a port conflict (CNI error, Event):
// the failure without its metric reason in front.
func message(err error) string {
	var f *failure
	if errors.As(err, &f) && (f.reason == reasonReservedPort || f.reason == reasonPortInUse || f.reason == reasonNetnsOwner) {
		return f.err.Error()
	}
	return err.Error()
}

// eventReason is the Kubernetes Event reason of an enrollment failure.
func eventReason(err error) string {
	switch reasonOf(err) {
	case reasonReservedPort:
		return eventReservedPort
	case reasonPortInUse:
		return eventPortInUse
	case reasonNetnsOwner:
		return eventNetnsOwner
	}
	return "EnrollmentFailed"
}

// socketOwner names the process holding socket inode (`comm` and pid),
// "" if none is found. It reads every process's fds: only on the error
// path.
func socketOwner(procRoot string, inode uint32) string {
	if inode == 0 || procRoot == "" {
		return ""
	}
	want := "socket:[" + strconv.FormatUint(uint64(inode), 10) + "]"
	ents, err := os.ReadDir(procRoot)
	if err != nil {
		return ""
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid <= 0 {
			continue
		}
		fdDir := filepath.Join(procRoot, e.Name(), "fd")
		fds, err := os.ReadDir(fdDir)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			if l, err := os.Readlink(filepath.Join(fdDir, fd.Name())); err == nil && l == want {
				comm, _ := os.ReadFile(filepath.Join(procRoot, e.Name(), "comm"))
				return fmt.Sprintf("process %q (pid %d)", strings.TrimSpace(string(comm)), pid)
			}
		}
	}
	return ""
}
