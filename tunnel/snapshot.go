package tunnel

// This file answers an operator's question, "how many connections does
// each pod have, of which kind" (ambit-agent status, node-agent/admin),
// from what the data path keeps anyway: the share's per-pod count, the
// live inbound connections Reauthorize needs, the pod's inbound HBONE
// connections Close needs and its outbound pool. Nothing is counted for
// it on the data path; it is read under those structures' own locks,
// each held for one pass, never two at once.

// ConnCounts is what one served pod holds at the moment of the look.
// The counts are read one after the other, not atomically: a connection
// that starts or ends meanwhile may be in one and not another. No one
// lock guards them all: Held is an atomic counter each connection moves
// without a lock (share.go), the live connections are the Proxy's
// (p.mu, all pods), the inbound HBONE connections the Serving's (sv.mu),
// the pool its own, and each pooled connection's streams that
// connection's lock, never taken while the pool's is held. One
// consistent read would put a lock on every connection's admission and
// end (session 15 looked, and left it).
type ConnCounts struct {
	// Held is every connection the pod holds against the agent's
	// connection budget: outbound from it and inbound to it, established
	// or still being set up (share.go).
	Held int
	// InboundHBONE and InboundPlaintext are the established inbound
	// connections, authorized and relaying to the app: streams arriving
	// over HBONE (15008) and plaintext ones (15006, permissive mode).
	InboundHBONE, InboundPlaintext int
	// OutboundHBONE is the streams open (or being opened) on the pod's
	// pooled outbound HBONE connections.
	OutboundHBONE int
	// HBONEConnsIn and HBONEConnsOut are the mTLS connections carrying
	// those streams: accepted on the pod's 15008, and in its pool.
	HBONEConnsIn, HBONEConnsOut int
}

// OutboundOther is what Held leaves once the counted kinds are taken
// away: mostly outbound passthrough (destinations outside the mesh),
// plus connections of any kind still being set up. Never negative.
func (c ConnCounts) OutboundOther() int {
	return max(0, c.Held-c.InboundHBONE-c.InboundPlaintext-c.OutboundHBONE)
}

// ConnCounts returns the counts of every pod served now (pods closed
// and draining are left out). One pass over the live inbound
// connections, whatever the number of pods.
func (p *Proxy) ConnCounts() map[*Serving]ConnCounts {
	p.mu.Lock()
	out := make(map[*Serving]ConnCounts, len(p.servings))
	for sv := range p.servings {
		out[sv] = ConnCounts{}
	}
	for lc := range p.live {
		c, ok := out[lc.sv]
		if !ok {
			continue // its pod is draining
		}
		if lc.info.Plaintext {
			c.InboundPlaintext++
		} else {
			c.InboundHBONE++
		}
		out[lc.sv] = c
	}
	p.mu.Unlock()
	for sv, c := range out {
		out[sv] = sv.ownCounts(c)
	}
	return out
}

// ConnCounts is Proxy.ConnCounts for this pod alone (served or not).
func (sv *Serving) ConnCounts() ConnCounts {
	var c ConnCounts
	sv.p.mu.Lock()
	for lc := range sv.p.live {
		switch {
		case lc.sv != sv:
		case lc.info.Plaintext:
			c.InboundPlaintext++
		default:
			c.InboundHBONE++
		}
	}
	sv.p.mu.Unlock()
	return sv.ownCounts(c)
}

// ownCounts adds to c what sv itself keeps.
func (sv *Serving) ownCounts(c ConnCounts) ConnCounts {
	c.Held = sv.Connections()
	sv.mu.Lock()
	c.HBONEConnsIn = len(sv.hconns)
	sv.mu.Unlock()
	c.OutboundHBONE, c.HBONEConnsOut = sv.pool.counts()
	return c
}

// counts is the streams open on the pool's connections and their number.
// The connections are copied under the pool's lock and asked outside it:
// a connection's lock is never taken while the pool's is held.
func (pl *pool) counts() (streams, conns int) {
	pl.mu.Lock()
	var cs []pooledConn
	for _, e := range pl.m {
		cs = append(cs, e.conns...)
	}
	pl.mu.Unlock()
	for _, c := range cs {
		streams += c.ActiveStreams()
	}
	return streams, len(cs)
}
