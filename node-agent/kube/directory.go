package kube

import (
	"net/netip"
	"sync"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"

	"github.com/ambit-mesh/ambit/tunnel"
)

// directory is the pod IP → workload index behind WorkloadByIP. Entries are
// built once per pod change (identity string included) so the per-connection
// lookup is a map read under a read lock.
type directory struct {
	trustDomain string

	mu    sync.RWMutex
	byIP  map[netip.Addr][]ipClaim // usually one; several only during IP reuse
	byUID map[types.UID]*dirEntry
	seq   uint64 // counts claims, to prefer the newest owner of an IP
}

type dirEntry struct {
	wl       tunnel.Workload
	terminal bool // Succeeded/Failed: its IP may already belong to someone else
	deleting bool // deletionTimestamp set
}

// ipClaim is one pod's claim on an IP. seq orders claims by when the pod
// was first seen with that IP, not by its last update: a late status
// update of a pod whose sandbox (and IP) is already gone must not take
// the IP back from the pod that holds it now.
type ipClaim struct {
	e   *dirEntry
	seq uint64
}

func (d *directory) init(td string) {
	d.trustDomain = td
	d.byIP = map[netip.Addr][]ipClaim{}
	d.byUID = map[types.UID]*dirEntry{}
}

// Identity is the SPIFFE ID of a service account.
func Identity(trustDomain, namespace, serviceAccount string) string {
	return "spiffe://" + trustDomain + "/ns/" + namespace + "/sa/" + serviceAccount
}

// Meshed reports what the directory tells the tunnel: the pod's agent has
// written ambit.dev/redirection=enabled on it (see the package comment).
func Meshed(p *corev1.Pod) bool {
	return p.Annotations[RedirectionAnnotation] == "enabled"
}

func (d *directory) upsert(obj any) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.upsertLocked(p)
}

// replace is upsert of p, after removing the entry of old when it is
// another UID (a pod made again under its name, reported by a relist as
// an update): in one critical section, so an IP both hold (a CNI that
// keeps a StatefulSet pod's IP) never resolves to nothing meanwhile.
func (d *directory) replace(old, p *corev1.Pod) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if old.UID != p.UID {
		d.removeLocked(old.UID)
	}
	d.upsertLocked(p)
}

// upsertLocked: d.mu is held.
func (d *directory) upsertLocked(p *corev1.Pod) {
	// The claims this pod already holds keep their order.
	since := map[netip.Addr]uint64{}
	if prev, ok := d.byUID[p.UID]; ok {
		for _, ip := range prev.wl.IPs {
			for _, c := range d.byIP[ip] {
				if c.e == prev {
					since[ip] = c.seq
				}
			}
		}
	}
	d.removeLocked(p.UID)
	// Host-network pods share the node's IP: they are not addressable as
	// workloads and must not shadow each other or the node.
	if p.Spec.HostNetwork {
		return
	}
	ips := podIPs(p)
	if len(ips) == 0 {
		return
	}
	e := &dirEntry{
		wl: tunnel.Workload{
			UID:            string(p.UID),
			Namespace:      p.Namespace,
			Name:           p.Name,
			ServiceAccount: serviceAccount(p),
			Labels:         p.Labels,
			IPs:            ips,
			Identity:       Identity(d.trustDomain, p.Namespace, serviceAccount(p)),
			Meshed:         Meshed(p),
		},
		terminal: p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed,
		deleting: p.DeletionTimestamp != nil,
	}
	d.byUID[p.UID] = e
	for _, ip := range ips {
		seq, ok := since[ip]
		if !ok {
			d.seq++
			seq = d.seq
		}
		d.byIP[ip] = append(d.byIP[ip], ipClaim{e: e, seq: seq})
	}
}

func (d *directory) remove(obj any) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	d.mu.Lock()
	d.removeLocked(p.UID)
	d.mu.Unlock()
}

func (d *directory) removeLocked(uid types.UID) {
	e, ok := d.byUID[uid]
	if !ok {
		return
	}
	delete(d.byUID, uid)
	for _, ip := range e.wl.IPs {
		list := d.byIP[ip]
		for i, x := range list {
			if x.e == e {
				list = append(list[:i:i], list[i+1:]...)
				break
			}
		}
		if len(list) == 0 {
			delete(d.byIP, ip)
		} else {
			d.byIP[ip] = list
		}
	}
}

// lookup picks the owner of ip: a running pod over one being deleted, the
// newest claim among equals; a terminal pod never owns an IP.
func (d *directory) lookup(ip netip.Addr) (tunnel.Workload, bool) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	var best ipClaim
	for _, c := range d.byIP[ip.Unmap()] {
		if c.e.terminal {
			continue
		}
		if best.e == nil || (best.e.deleting && !c.e.deleting) || (best.e.deleting == c.e.deleting && c.seq > best.seq) {
			best = c
		}
	}
	if best.e == nil {
		return tunnel.Workload{}, false
	}
	return best.e.wl, true
}

// WorkloadByIP implements tunnel.Directory. The returned Labels and IPs
// are shared and read-only.
func (s *Source) WorkloadByIP(ip netip.Addr) (tunnel.Workload, bool) {
	return s.dir.lookup(ip)
}
