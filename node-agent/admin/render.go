package admin

import (
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// Views of `ambit-agent status`.
const (
	ViewPods  = "pods"
	ViewCerts = "certs"
	ViewConns = "conns"
)

// Render writes st as a table for a person: view is ViewPods (the
// default), ViewCerts or ViewConns. Ages and times left are against the
// agent's clock (Agent.Now).
func Render(w io.Writer, st *Status, view string) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	header(tw, st)
	switch view {
	case "", ViewPods:
		renderPods(tw, st)
	case ViewCerts:
		renderCerts(tw, st)
	case ViewConns:
		renderConns(tw, st)
	default:
		return fmt.Errorf("unknown view %q (pods, certs or conns)", view)
	}
	return tw.Flush()
}

// WriteJSON writes v (a Status, or a list of them) indented.
func WriteJSON(w io.Writer, v any) error {
	e := json.NewEncoder(w)
	e.SetIndent("", "  ")
	return e.Encode(v)
}

func header(w io.Writer, st *Status) {
	a := st.Agent
	state := "ready"
	switch {
	case a.Stopping:
		state = "stopping (draining)"
	case !a.Ready:
		state = "starting"
	}
	fmt.Fprintf(w, "# agent %s, pid %d, node %s, %s source, %s, up %s\n",
		oneLine(orDash(a.Instance)), a.PID, oneLine(orDash(a.Node)), oneLine(orDash(a.Source)), state, age(a.Now, a.Started))
}

func renderPods(w io.Writer, st *Status) {
	var enrolled, pending, failed int
	for _, p := range st.Pods {
		switch p.State {
		case StateEnrolled:
			enrolled++
		case StatePending:
			pending++
		case StateFailed:
			failed++
		}
	}
	fmt.Fprintf(w, "# pods: %d enrolled, %d pending, %d failed\n", enrolled, pending, failed)
	fmt.Fprintln(w, "NAMESPACE\tPOD\tIP\tSTATE\tBACKEND\tLISTENERS\tRULES\tIDENTITY\tCERT EXPIRES\tCONNS IN/OUT")
	now := st.Agent.Now
	for _, p := range st.Pods {
		state := p.State
		if p.Reason != "" {
			state += ": " + p.Reason
		}
		conns := "-"
		if c := p.Connections; c != nil {
			conns = fmt.Sprintf("%d/%d", c.In(), c.Out())
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", oneLine(p.Namespace), oneLine(p.Name), ips(p.IPs), oneLine(state),
			oneLine(orDash(p.Backend)), ports(p.Listeners), oneLine(rules(now, p.Rules)), oneLine(shortID(p.Identity)), left(now, p.CertNotAfter), conns)
	}
	// What went wrong, in full, below the table it would stretch.
	for _, p := range st.Pods {
		if p.Message != "" {
			fmt.Fprintf(w, "# %s %s/%s: %s\n", oneLine(p.State), oneLine(p.Namespace), oneLine(p.Name), oneLine(p.Message))
		}
		if r := p.Rules; r != nil && r.Problem != "" {
			fmt.Fprintf(w, "# rules %s %s/%s %s ago: %s\n", oneLine(r.Result), oneLine(p.Namespace), oneLine(p.Name), age(now, r.At), oneLine(r.Problem))
		}
	}
}

func renderCerts(w io.Writer, st *Status) {
	now := st.Agent.Now
	fmt.Fprintf(w, "# certificates: %d\n", len(st.Certificates))
	fmt.Fprintln(w, "IDENTITY\tSERIAL\tNOT AFTER\tLEFT\tISSUER\tPODS\tNEXT FETCH\tSTATE")
	for _, c := range st.Certificates {
		state := "ok"
		switch {
		case c.Fetching:
			state = "fetching"
		case c.Failures > 0:
			state = fmt.Sprintf("%d failed fetches", c.Failures)
		case c.NotAfter.IsZero():
			state = "none yet"
		}
		// An expired certificate fails every handshake: the first word a
		// person scanning the column must see, whatever else holds.
		if !c.NotAfter.IsZero() && !c.NotAfter.After(now) {
			if state == "ok" {
				state = "expired"
			} else {
				state = "expired, " + state
			}
		}
		notAfter := "-"
		if !c.NotAfter.IsZero() {
			notAfter = c.NotAfter.UTC().Format(time.RFC3339)
		}
		next := "-"
		if !c.NextFetch.IsZero() {
			next = "in " + age(c.NextFetch, now)
			if !c.NextFetch.After(now) {
				next = "due"
			}
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\n", oneLine(c.Identity), oneLine(orDash(c.Serial)), notAfter, left(now, c.NotAfter),
			oneLine(orDash(c.Issuer)), c.Pods, next, state)
	}
	for _, c := range st.Certificates {
		if c.LastError != "" {
			fmt.Fprintf(w, "# %s: last fetch failed %s ago: %s\n", oneLine(c.Identity), age(now, c.LastFailure), oneLine(c.LastError))
		}
	}
	fmt.Fprintf(w, "# trust bundle: %d roots\n", len(st.TrustBundle))
	fmt.Fprintln(w, "SUBJECT\tSHA256\tNOT AFTER\tLEFT")
	for _, r := range st.TrustBundle {
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", oneLine(r.Subject), oneLine(r.SHA256), r.NotAfter.UTC().Format(time.RFC3339), left(now, r.NotAfter))
	}
}

func renderConns(w io.Writer, st *Status) {
	fmt.Fprintln(w, "NAMESPACE\tPOD\tIN HBONE\tIN PLAINTEXT\tOUT HBONE\tOUT PASSTHROUGH\tHELD\tMTLS CONNS IN/OUT")
	row := func(ns, name string, c PodConnections) {
		fmt.Fprintf(w, "%s\t%s\t%d\t%d\t%d\t%d\t%d\t%d/%d\n", oneLine(ns), oneLine(name), c.InboundHBONE, c.InboundPlaintext,
			c.OutboundHBONE, c.OutboundPassthrough, c.Held, c.HBONEConnectionsIn, c.HBONEConnectionsOut)
	}
	for _, p := range st.Pods {
		if p.Connections != nil {
			row(p.Namespace, p.Name, *p.Connections)
		}
	}
	row("TOTAL", "", st.Connections.Pods)
	budget := "no budget"
	if st.Connections.Budget > 0 {
		budget = "budget " + strconv.Itoa(st.Connections.Budget)
	}
	fmt.Fprintf(w, "# the agent holds %d connections (pods draining included), %s\n", st.Connections.Held, budget)
}

func ips(a []netip.Addr) string {
	if len(a) == 0 {
		return "-"
	}
	s := make([]string, len(a))
	for i, ip := range a {
		s[i] = ip.String()
	}
	return strings.Join(s, ",")
}

func ports(p []uint16) string {
	if len(p) == 0 {
		return "-"
	}
	s := make([]string, len(p))
	for i, n := range p {
		s[i] = strconv.Itoa(int(n))
	}
	return strings.Join(s, ",")
}

func rules(now time.Time, r *RuleCheck) string {
	if r == nil {
		return "-"
	}
	return r.Result + "/" + age(now, r.At)
}

// shortID is a SPIFFE ID without its scheme and trust domain: the
// namespace and service account a person looks for (the JSON has it
// whole).
func shortID(id string) string {
	if id == "" {
		return "-"
	}
	if rest, ok := strings.CutPrefix(id, "spiffe://"); ok {
		if i := strings.IndexByte(rest, '/'); i >= 0 {
			return rest[i+1:]
		}
	}
	return id
}

// left is the time from now to t: "-" for none, "expired" past it.
func left(now, t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	if !t.After(now) {
		return "expired"
	}
	return age(t, now)
}

// age is t−since, short: 45s, 12m3s, 5h2m, 3d4h.
func age(t, since time.Time) string {
	if t.IsZero() || since.IsZero() {
		return "-"
	}
	d := t.Sub(since)
	if d < 0 {
		d = 0
	}
	switch {
	case d < time.Minute:
		return strconv.Itoa(int(d/time.Second)) + "s"
	case d < time.Hour:
		return fmt.Sprintf("%dm%ds", d/time.Minute, d%time.Minute/time.Second)
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh%dm", d/time.Hour, d%time.Hour/time.Minute)
	default:
		return fmt.Sprintf("%dd%dh", d/(24*time.Hour), d%(24*time.Hour)/time.Hour)
	}
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// oneLine keeps a message, and every table cell, on its line: an error
// may carry newlines, and a cell a tab or newline (a root's subject comes
// from whoever made the CA) that would shift the columns or forge a row.
func oneLine(s string) string {
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, s)
}
