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
	byIP  map[netip.Addr][]*dirEntry // usually one; several only during IP reuse
	byUID map[types.UID]*dirEntry
	seq   uint64 // order of upserts, to prefer the newest owner of an IP
}

type dirEntry struct {
	wl       tunnel.Workload
	terminal bool // Succeeded/Failed: its IP may already belong to someone else
	deleting bool // deletionTimestamp set
	seq      uint64
}

func (d *directory) init(td string) {
	d.trustDomain = td
	d.byIP = map[netip.Addr][]*dirEntry{}
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
	d.seq++
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
		seq:      d.seq,
	}
	d.byUID[p.UID] = e
	for _, ip := range ips {
		d.byIP[ip] = append(d.byIP[ip], e)
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
			if x == e {
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
// most recently seen among equals; a terminal pod never owns an IP.
func (d *directory) lookup(ip netip.Addr) (tunnel.Workload, bool) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	var best *dirEntry
	for _, e := range d.byIP[ip.Unmap()] {
		if e.terminal {
			continue
		}
		if best == nil || (best.deleting && !e.deleting) || (best.deleting == e.deleting && e.seq > best.seq) {
			best = e
		}
	}
	if best == nil {
		return tunnel.Workload{}, false
	}
	return best.wl, true
}

// WorkloadByIP implements tunnel.Directory. The returned Labels and IPs
// are shared and read-only.
func (s *Source) WorkloadByIP(ip netip.Addr) (tunnel.Workload, bool) {
	return s.dir.lookup(ip)
}
