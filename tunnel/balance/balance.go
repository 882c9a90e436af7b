package balance

import (
	mrand "math/rand/v2"
	"net/netip"
	"sync"
	"time"
)

// DefaultMaxEntries caps a Table made with NewTable(0). The clients are
// the pods of one node (about 110, two addresses each when dual-stack),
// so the cap is reached only with well over a hundred affinity Service
// ports in use by every pod; an entry costs about 250 bytes, so a full
// table about 4 MB.
const DefaultMaxEntries = 1 << 14

// key is one client of one Service port. port is the Service port's
// identity across its addresses; a directory that has none leaves it
// empty and the address itself (addr) is the key.
type key struct {
	client netip.Addr
	port   string
	addr   netip.AddrPort
}

// entry is one remembered choice, linked in least-recently-used order.
type entry struct {
	key        key
	ep         netip.AddrPort
	idx        int           // where ep was in the endpoint list: checked first
	last       time.Time     // the client's last connection
	timeout    time.Duration // the Service's timeout at that connection
	prev, next *entry
}

// Table remembers ClientIP session affinity. Safe for concurrent use.
type Table struct {
	mu  sync.Mutex
	m   map[key]*entry
	lru entry // sentinel: lru.next is the most recent, lru.prev the least
	max int
}

// NewTable returns a table that holds at most max entries
// (DefaultMaxEntries when max <= 0).
func NewTable(max int) *Table {
	if max <= 0 {
		max = DefaultMaxEntries
	}
	t := &Table{m: map[key]*entry{}, max: max}
	t.lru.next, t.lru.prev = &t.lru, &t.lru
	return t
}

// Random is the choice without affinity: uniform over eps (not empty).
// Small enough to inline: the common path pays nothing for affinity.
func Random(eps []netip.AddrPort) netip.AddrPort {
	return eps[mrand.IntN(len(eps))]
}

// Choose returns the endpoint for a new connection from client to the
// Service address vip under sessionAffinity ClientIP with timeout
// (Random when timeout <= 0). eps are the Service's usable endpoints
// (not empty; read, never kept beyond the call); port identifies the
// Service port across its addresses ("" to key on vip). now is the
// connection's time (monotonic).
func (t *Table) Choose(client netip.Addr, vip netip.AddrPort, port string, eps []netip.AddrPort, timeout time.Duration, now time.Time) netip.AddrPort {
	if timeout <= 0 {
		return Random(eps)
	}
	k := key{client: client, port: port}
	if port == "" {
		k.addr = vip
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	e := t.m[k]
	// The Service's current timeout decides, so shortening it takes
	// effect at once.
	if e != nil && now.Sub(e.last) < timeout {
		if i := indexOf(eps, e.ep, e.idx); i >= 0 {
			e.idx, e.last, e.timeout = i, now, timeout
			t.touch(e)
			return e.ep
		}
		// The endpoint is gone (deleted, not ready, or no longer in
		// this address's list): choose again, as kube-proxy does when
		// its rule for that endpoint disappears.
	}
	i := mrand.IntN(len(eps))
	if e == nil {
		t.reap(now, 2)
		if len(t.m) >= t.max {
			// Full of live entries: the least recently used client
			// forgets its endpoint (its entry is reused).
			e = t.lru.prev
			t.drop(e)
			*e = entry{key: k}
		} else {
			e = &entry{key: k}
		}
		t.m[k] = e
	} else {
		t.unlink(e)
	}
	e.ep, e.idx, e.last, e.timeout = eps[i], i, now, timeout
	t.pushFront(e)
	return e.ep
}

// indexOf finds ep in eps, trying hint first: endpoint lists change
// rarely, so the remembered position is usually still right and a
// Service of thousands of endpoints costs no scan.
func indexOf(eps []netip.AddrPort, ep netip.AddrPort, hint int) int {
	if hint >= 0 && hint < len(eps) && eps[hint] == ep {
		return hint
	}
	for i, x := range eps {
		if x == ep {
			return i
		}
	}
	return -1
}

// reap drops up to n expired entries from the least recently used end.
// Entries there are the oldest, so expired ones gather there; an entry
// with a long timeout can hold others back, but never beyond the cap.
func (t *Table) reap(now time.Time, n int) {
	for ; n > 0; n-- {
		e := t.lru.prev
		if e == &t.lru || now.Sub(e.last) < e.timeout {
			return
		}
		t.drop(e)
	}
}

func (t *Table) drop(e *entry) {
	if e == &t.lru {
		return
	}
	t.unlink(e)
	delete(t.m, e.key)
}

func (t *Table) touch(e *entry) {
	if t.lru.next == e {
		return
	}
	t.unlink(e)
	t.pushFront(e)
}

func (t *Table) unlink(e *entry) {
	e.prev.next, e.next.prev = e.next, e.prev
	e.prev, e.next = nil, nil
}

func (t *Table) pushFront(e *entry) {
	e.prev, e.next = &t.lru, t.lru.next
	t.lru.next.prev = e
	t.lru.next = e
}

// Len is the number of entries held (expired ones included until reaped).
func (t *Table) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.m)
}
