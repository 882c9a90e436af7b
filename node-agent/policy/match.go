package policy

import (
	"net/netip"
	"slices"
	"strings"
)

// query is one connection as the rules see it; built once per Authorize.
type query struct {
	principal string // identity without "spiffe://"; "" for plaintext
	namespace string // namespace from the identity; "" for plaintext
	sa        string // service account (last segment after "/sa/")
	ip        netip.Addr
	port      uint16
}

func makeQuery(identity string, plaintext bool, ip netip.Addr, port uint16) query {
	q := query{ip: ip.Unmap(), port: port}
	if plaintext || identity == "" {
		return q
	}
	q.principal = strings.TrimPrefix(identity, "spiffe://")
	q.namespace = namespaceOf(q.principal)
	q.sa = serviceAccountOf(q.principal)
	return q
}

// serviceAccountOf returns X when principal ends with "/sa/X": exactly the
// principals a "*/sa/X" pattern matches.
func serviceAccountOf(principal string) string {
	i := strings.LastIndexByte(principal, '/')
	if i < 0 || !strings.HasSuffix(principal[:i], "/sa") {
		return ""
	}
	return principal[i+1:]
}

// namespaceOf extracts <ns> from "<td>/ns/<ns>/sa/<sa>" without allocating.
func namespaceOf(principal string) string {
	i := strings.Index(principal, "/ns/")
	if i < 0 {
		return ""
	}
	rest := principal[i+len("/ns/"):]
	if j := strings.IndexByte(rest, '/'); j >= 0 {
		return rest[:j]
	}
	return rest
}

// matcher is a compiled list of patterns.
type matcher struct {
	set   bool
	exact []string            // short lists: a scan beats hashing
	big   map[string]struct{} // long lists of exact values
	pats  []pattern           // prefix, suffix, any
}

const bigSet = 8

func newMatcher(list []string) matcher {
	m := matcher{set: len(list) > 0}
	for _, s := range list {
		p, err := parsePattern(s)
		if err != nil {
			continue // validated before; never reached for accepted rules
		}
		if p.kind == matchExact {
			m.exact = append(m.exact, p.s)
		} else {
			m.pats = append(m.pats, p)
		}
	}
	if len(m.exact) > bigSet {
		m.big = make(map[string]struct{}, len(m.exact))
		for _, s := range m.exact {
			m.big[s] = struct{}{}
		}
		m.exact = nil
	}
	return m
}

func (m *matcher) match(v string) bool {
	if m.big != nil {
		if _, ok := m.big[v]; ok {
			return true
		}
	}
	for _, e := range m.exact {
		if e == v {
			return true
		}
	}
	for _, p := range m.pats {
		if p.match(v) {
			return true
		}
	}
	return false
}

// rule is a compiled Rule.
type rule struct {
	pol                       *compiledPolicy
	principals, notPrincipals matcher
	namespaces, notNamespaces matcher
	ipBlocks, notIPBlocks     []netip.Prefix
	ports, notPorts           []uint16
}

func compileRule(pol *compiledPolicy, r *Rule) *rule {
	c := &rule{pol: pol}
	if f := r.From; f != nil {
		c.principals = newMatcher(f.Principals)
		c.notPrincipals = newMatcher(f.NotPrincipals)
		c.namespaces = newMatcher(f.Namespaces)
		c.notNamespaces = newMatcher(f.NotNamespaces)
		c.ipBlocks = blocks(f.IPBlocks)
		c.notIPBlocks = blocks(f.NotIPBlocks)
	}
	if t := r.To; t != nil {
		c.ports = ports(t.Ports)
		c.notPorts = ports(t.NotPorts)
	}
	return c
}

func blocks(list []string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range list {
		if p, err := parseBlock(s); err == nil {
			out = append(out, p)
		}
	}
	return out
}

func ports(list []int32) []uint16 {
	var out []uint16
	for _, p := range list {
		if p >= 1 && p <= 65535 {
			out = append(out, uint16(p))
		}
	}
	return out
}

// matches: every field that is set must match. Identity fields never
// match a plaintext peer; negated identity fields always do (so
// "notPrincipals: ['*']" selects plaintext, as in Istio).
func (r *rule) matches(q *query) bool {
	if r.principals.set && (q.principal == "" || !r.principals.match(q.principal)) {
		return false
	}
	if r.notPrincipals.set && q.principal != "" && r.notPrincipals.match(q.principal) {
		return false
	}
	if r.namespaces.set && (q.namespace == "" || !r.namespaces.match(q.namespace)) {
		return false
	}
	if r.notNamespaces.set && q.namespace != "" && r.notNamespaces.match(q.namespace) {
		return false
	}
	if len(r.ipBlocks) > 0 && !containsIP(r.ipBlocks, q.ip) {
		return false
	}
	if len(r.notIPBlocks) > 0 && containsIP(r.notIPBlocks, q.ip) {
		return false
	}
	if len(r.ports) > 0 && !hasPort(r.ports, q.port) {
		return false
	}
	if len(r.notPorts) > 0 && hasPort(r.notPorts, q.port) {
		return false
	}
	return true
}

func containsIP(list []netip.Prefix, ip netip.Addr) bool {
	for _, p := range list {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

func hasPort(list []uint16, port uint16) bool {
	for _, p := range list {
		if p == port {
			return true
		}
	}
	return false
}

// ruleSet answers "does any of these rules match?" without scanning them
// all: each rule is filed under the most selective key it has (exact
// principal, namespace, port); only rules with none of those are scanned.
type ruleSet struct {
	byPrincipal map[string][]*rule
	byNamespace map[string][]*rule
	bySA        map[string][]*rule // suffix patterns "*/sa/X"
	byBlock     map[netip.Prefix][]*rule
	blockBits   []int // prefix lengths present in byBlock, longest first
	byPort      map[uint16][]*rule
	scan        []*rule
	size        int
}

func (s *ruleSet) add(r *rule) {
	s.size++
	if keys, ok := exactKeys(&r.principals); ok {
		if s.byPrincipal == nil {
			s.byPrincipal = map[string][]*rule{}
		}
		for _, k := range keys {
			s.byPrincipal[k] = append(s.byPrincipal[k], r)
		}
		return
	}
	if keys, ok := principalNamespaces(&r.principals); ok {
		s.fileNamespaces(keys, r)
		return
	}
	if keys, ok := principalSAs(&r.principals); ok {
		if s.bySA == nil {
			s.bySA = map[string][]*rule{}
		}
		for _, k := range keys {
			s.bySA[k] = append(s.bySA[k], r)
		}
		return
	}
	if keys, ok := exactKeys(&r.namespaces); ok {
		s.fileNamespaces(keys, r)
		return
	}
	if len(r.ipBlocks) > 0 {
		if s.byBlock == nil {
			s.byBlock = map[netip.Prefix][]*rule{}
		}
		for _, b := range r.ipBlocks {
			if len(s.byBlock[b]) == 0 || s.byBlock[b][len(s.byBlock[b])-1] != r {
				s.byBlock[b] = append(s.byBlock[b], r)
			}
			if !slices.Contains(s.blockBits, b.Bits()) {
				s.blockBits = append(s.blockBits, b.Bits())
				slices.SortFunc(s.blockBits, func(a, b int) int { return b - a })
			}
		}
		return
	}
	if len(r.ports) > 0 {
		if s.byPort == nil {
			s.byPort = map[uint16][]*rule{}
		}
		for _, p := range r.ports {
			s.byPort[p] = append(s.byPort[p], r)
		}
		return
	}
	s.scan = append(s.scan, r)
}

func (s *ruleSet) fileNamespaces(keys []string, r *rule) {
	if s.byNamespace == nil {
		s.byNamespace = map[string][]*rule{}
	}
	seen := map[string]bool{}
	for _, k := range keys {
		if !seen[k] {
			seen[k] = true
			s.byNamespace[k] = append(s.byNamespace[k], r)
		}
	}
}

// exactKeys lists m's values when m is set and holds only exact ones.
func exactKeys(m *matcher) ([]string, bool) {
	if !m.set || len(m.pats) > 0 {
		return nil, false
	}
	if m.big == nil {
		return m.exact, true
	}
	keys := make([]string, 0, len(m.big))
	for k := range m.big {
		keys = append(keys, k)
	}
	return keys, true
}

// principalNamespaces: when every principal pattern pins the namespace
// (exact IDs, or prefixes like "td/ns/shop/"), the rule can be filed by
// namespace: no identity outside those namespaces can match it.
func principalNamespaces(m *matcher) ([]string, bool) {
	if !m.set {
		return nil, false
	}
	var out []string
	add := func(v string, prefix bool) bool {
		i := strings.Index(v, "/ns/")
		if i < 0 || strings.Contains(v[:i], "/") {
			return false
		}
		rest := v[i+len("/ns/"):]
		j := strings.IndexByte(rest, '/')
		if j <= 0 {
			if prefix {
				return false // "td/ns/sho*" does not pin the namespace
			}
			out = append(out, rest)
			return rest != ""
		}
		out = append(out, rest[:j])
		return true
	}
	for _, p := range m.pats {
		if p.kind != matchPrefix || !add(p.s, true) {
			return nil, false
		}
	}
	keys, _ := exactKeys(&matcher{set: true, exact: m.exact, big: m.big})
	for _, k := range keys {
		if !add(k, false) {
			return nil, false
		}
	}
	return out, true
}

// principalSAs: when every principal pattern is "*/sa/X", the rule is
// filed by service account X.
func principalSAs(m *matcher) ([]string, bool) {
	if !m.set || len(m.exact) > 0 || m.big != nil {
		return nil, false
	}
	var out []string
	for _, p := range m.pats {
		sa, ok := strings.CutPrefix(p.s, "/sa/")
		if p.kind != matchSuffix || !ok || sa == "" || strings.Contains(sa, "/") {
			return nil, false
		}
		out = append(out, sa)
	}
	return out, true
}

func (s *ruleSet) match(q *query) *rule {
	if s.size == 0 {
		return nil
	}
	if q.principal != "" {
		for _, r := range s.byPrincipal[q.principal] {
			if r.matches(q) {
				return r
			}
		}
	}
	if q.namespace != "" {
		for _, r := range s.byNamespace[q.namespace] {
			if r.matches(q) {
				return r
			}
		}
	}
	if q.sa != "" {
		for _, r := range s.bySA[q.sa] {
			if r.matches(q) {
				return r
			}
		}
	}
	for _, bits := range s.blockBits {
		if bits > q.ip.BitLen() {
			continue
		}
		pfx, err := q.ip.Prefix(bits)
		if err != nil {
			continue
		}
		for _, r := range s.byBlock[pfx] {
			if r.matches(q) {
				return r
			}
		}
	}
	for _, r := range s.byPort[q.port] {
		if r.matches(q) {
			return r
		}
	}
	for _, r := range s.scan {
		if r.matches(q) {
			return r
		}
	}
	return nil
}
