package policy

import (
	"encoding/json"
	"slices"
	"strconv"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation/field"
)

// IstioAPIVersion is the Istio API read for migrating users (v1beta1 has
// the same schema and is read the same way).
const IstioAPIVersion = "security.istio.io/v1"

// IstioAuthorizationPolicy is Istio's AuthorizationPolicy, read so that
// users moving from Istio keep their L4 policies. Convert says what Ambit
// honours: selector; action ALLOW/DENY (CUSTOM is enforced as DENY of its
// L4 part, AUDIT has no effect); from.source principals, namespaces,
// serviceAccounts, ipBlocks, remoteIpBlocks and their not- forms;
// to.operation ports/notPorts; when on source.ip, remote.ip,
// source.namespace, source.principal, destination.port. Everything else
// (L7: requestPrincipals, hosts, methods, paths, request.* conditions;
// targetRef, which addresses waypoints) is refused visibly.
type IstioAuthorizationPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              IstioAuthorizationPolicySpec `json:"spec"`
	Status            json.RawMessage              `json:"status,omitempty"` // istiod's; not ours

	problems field.ErrorList // from decoding
	unread   bool            // see AuthorizationPolicy.unread
}

// IstioAuthorizationPolicySpec mirrors Istio's spec.
type IstioAuthorizationPolicySpec struct {
	Selector   *Selector         `json:"selector,omitempty"`
	TargetRef  json.RawMessage   `json:"targetRef,omitempty"`
	TargetRefs []json.RawMessage `json:"targetRefs,omitempty"`
	Action     string            `json:"action,omitempty"`
	Provider   json.RawMessage   `json:"provider,omitempty"`
	Rules      []IstioRule       `json:"rules,omitempty"`
}

// IstioRule mirrors Istio's Rule.
type IstioRule struct {
	From []IstioFrom      `json:"from,omitempty"`
	To   []IstioTo        `json:"to,omitempty"`
	When []IstioCondition `json:"when,omitempty"`
}

type IstioFrom struct {
	Source *IstioSource `json:"source,omitempty"`
}

type IstioTo struct {
	Operation *IstioOperation `json:"operation,omitempty"`
}

type IstioSource struct {
	Principals           []string `json:"principals,omitempty"`
	NotPrincipals        []string `json:"notPrincipals,omitempty"`
	RequestPrincipals    []string `json:"requestPrincipals,omitempty"`
	NotRequestPrincipals []string `json:"notRequestPrincipals,omitempty"`
	Namespaces           []string `json:"namespaces,omitempty"`
	NotNamespaces        []string `json:"notNamespaces,omitempty"`
	ServiceAccounts      []string `json:"serviceAccounts,omitempty"`
	NotServiceAccounts   []string `json:"notServiceAccounts,omitempty"`
	IPBlocks             []string `json:"ipBlocks,omitempty"`
	NotIPBlocks          []string `json:"notIpBlocks,omitempty"`
	RemoteIPBlocks       []string `json:"remoteIpBlocks,omitempty"`
	NotRemoteIPBlocks    []string `json:"notRemoteIpBlocks,omitempty"`
}

type IstioOperation struct {
	Hosts      []string `json:"hosts,omitempty"`
	NotHosts   []string `json:"notHosts,omitempty"`
	Ports      []string `json:"ports,omitempty"`
	NotPorts   []string `json:"notPorts,omitempty"`
	Methods    []string `json:"methods,omitempty"`
	NotMethods []string `json:"notMethods,omitempty"`
	Paths      []string `json:"paths,omitempty"`
	NotPaths   []string `json:"notPaths,omitempty"`
}

type IstioCondition struct {
	Key       string   `json:"key"`
	Values    []string `json:"values,omitempty"`
	NotValues []string `json:"notValues,omitempty"`
}

// Convert translates p into an Ambit policy. issues lists every field
// Ambit cannot enforce at L4. Like ztunnel, it errs on the safe side: an
// ALLOW rule using such a field never matches, a DENY rule is kept with
// the field left out (it denies more). A nil policy means p is not for
// Ambit at all (targetRef: it belongs to a waypoint; AUDIT: no effect).
func (p *IstioAuthorizationPolicy) Convert() (*AuthorizationPolicy, field.ErrorList) {
	var issues field.ErrorList
	spec := field.NewPath("spec")
	// A null targetRef is no targetRef (unset, as Istio reads it); taken
	// as set, a DENY policy was dropped.
	if len(p.Spec.TargetRef) > 0 && string(p.Spec.TargetRef) != "null" || len(p.Spec.TargetRefs) > 0 {
		return nil, field.ErrorList{field.Forbidden(spec.Child("targetRef"), "policies attached to a waypoint or gateway are not enforced at L4")}
	}
	out := &AuthorizationPolicy{ObjectMeta: p.ObjectMeta, Spec: AuthorizationPolicySpec{Selector: p.Spec.Selector}}
	out.APIVersion, out.Kind = APIVersion, KindAuthorizationPolicy
	switch p.Spec.Action {
	case "", "ALLOW":
		out.Spec.Action = Allow
	case "DENY":
		out.Spec.Action = Deny
	case "CUSTOM":
		out.Spec.Action = Deny
		issues = append(issues, field.NotSupported(spec.Child("action"), p.Spec.Action, []string{"ALLOW", "DENY"}))
	case "AUDIT":
		return nil, field.ErrorList{field.NotSupported(spec.Child("action"), p.Spec.Action, []string{"ALLOW", "DENY"})}
	default:
		out.Spec.Action = Action(p.Spec.Action) // refused by validation: deny-all
	}
	allow := out.Spec.Action == Allow
	for i, ir := range p.Spec.Rules {
		rp := spec.Child("rules").Index(i)
		rules, bad, invalid := convertRule(&ir, rp)
		issues = append(issues, bad...)
		out.problems = append(out.problems, invalid...)
		if len(bad) > 0 && allow {
			continue // an ALLOW rule we cannot fully check must not allow
		}
		out.Spec.Rules = append(out.Spec.Rules, rules...)
	}
	// Unreadable or invalid: validation turns it into deny-all.
	out.problems = append(out.problems, p.problems...)
	out.unread = p.unread
	return out, issues
}

// convertRule returns the rule's Ambit rules, the fields Ambit cannot
// enforce (issues) and the values that are wrong (invalid: the policy is
// enforced fail-closed, as Istio refuses them).
func convertRule(ir *IstioRule, rp *field.Path) ([]Rule, field.ErrorList, field.ErrorList) {
	var issues, invalid field.ErrorList
	l7 := func(p *field.Path, list []string) {
		if len(list) > 0 {
			issues = append(issues, field.Forbidden(p, "L7 attribute, not enforceable at L4"))
		}
	}
	froms := []*Source{nil}
	if len(ir.From) > 0 {
		froms = froms[:0]
		for j, f := range ir.From {
			fp := rp.Child("from").Index(j).Child("source")
			s := f.Source
			if s == nil {
				froms = append(froms, nil)
				continue
			}
			l7(fp.Child("requestPrincipals"), s.RequestPrincipals)
			l7(fp.Child("notRequestPrincipals"), s.NotRequestPrincipals)
			sas, bad := serviceAccounts(s.ServiceAccounts, fp.Child("serviceAccounts"))
			invalid = append(invalid, bad...)
			notSAs, bad := serviceAccounts(s.NotServiceAccounts, fp.Child("notServiceAccounts"))
			invalid = append(invalid, bad...)
			if len(s.Principals)+len(s.NotPrincipals)+len(s.Namespaces)+len(s.NotNamespaces) > 0 &&
				len(s.ServiceAccounts)+len(s.NotServiceAccounts) > 0 {
				// Istio refuses this too. Service accounts are folded
				// into the principals below, which would make them an
				// alternative to the principals (OR) where the source
				// says both (AND).
				invalid = append(invalid, field.Forbidden(fp.Child("serviceAccounts"),
					"cannot be set with principals or namespaces"))
			}
			froms = append(froms, &Source{
				Principals:    append(slicesClone(s.Principals), sas...),
				NotPrincipals: append(slicesClone(s.NotPrincipals), notSAs...),
				Namespaces:    s.Namespaces,
				NotNamespaces: s.NotNamespaces,
				IPBlocks:      append(slicesClone(s.IPBlocks), s.RemoteIPBlocks...),
				NotIPBlocks:   append(slicesClone(s.NotIPBlocks), s.NotRemoteIPBlocks...),
			})
		}
	}
	tos := []*Destination{nil}
	if len(ir.To) > 0 {
		tos = tos[:0]
		for j, t := range ir.To {
			op := rp.Child("to").Index(j).Child("operation")
			o := t.Operation
			if o == nil {
				tos = append(tos, nil)
				continue
			}
			l7(op.Child("hosts"), o.Hosts)
			l7(op.Child("notHosts"), o.NotHosts)
			l7(op.Child("methods"), o.Methods)
			l7(op.Child("notMethods"), o.NotMethods)
			l7(op.Child("paths"), o.Paths)
			l7(op.Child("notPaths"), o.NotPaths)
			d := &Destination{}
			d.Ports, issues = istioPorts(o.Ports, op.Child("ports"), issues)
			d.NotPorts, issues = istioPorts(o.NotPorts, op.Child("notPorts"), issues)
			tos = append(tos, d)
		}
	}
	var rules []Rule
	for _, f := range froms {
		for _, t := range tos {
			// Each rule owns its from and to (lists included): when
			// conditions below are written into them rule by rule, and
			// a shared to would take one rule's condition twice.
			var r Rule
			if t != nil {
				r.To = &Destination{Ports: slices.Clone(t.Ports), NotPorts: slices.Clone(t.NotPorts)}
			}
			if f != nil {
				c := *f
				c.Principals, c.NotPrincipals = slices.Clone(f.Principals), slices.Clone(f.NotPrincipals)
				c.Namespaces, c.NotNamespaces = slices.Clone(f.Namespaces), slices.Clone(f.NotNamespaces)
				c.IPBlocks, c.NotIPBlocks = slices.Clone(f.IPBlocks), slices.Clone(f.NotIPBlocks)
				r.From = &c
			}
			rules = append(rules, r)
		}
	}
	// when: AND-ed with the rule; honoured where it narrows a field the
	// rule leaves open.
	for j, c := range ir.When {
		cp := rp.Child("when").Index(j)
		if !applyWhen(rules, &c) {
			issues = append(issues, field.Forbidden(cp.Child("key"), "condition "+strconvQuote(c.Key)+" is not enforceable at L4"))
		}
	}
	return rules, issues, invalid
}

// applyWhen ANDs condition c into every rule. A rule's positive list
// and the condition's values cannot be intersected in general (patterns,
// CIDRs), so that case is refused (false); negative lists AND into one
// longer negative list (not in A and not in B = not in A or B). Rules are
// only changed once the condition is known to apply to all of them.
func applyWhen(rules []Rule, c *IstioCondition) bool {
	var ps, nps []int32
	if c.Key == "destination.port" {
		var bad field.ErrorList
		ps, bad = istioPorts(c.Values, field.NewPath("when"), bad)
		nps, bad = istioPorts(c.NotValues, field.NewPath("when"), bad)
		if len(bad) > 0 {
			return false
		}
	}
	// lists returns the rule's positive and negative lists for c.Key.
	lists := func(r *Rule) (pos, neg *[]string, ok bool) {
		f := r.From
		if f == nil {
			f = &Source{}
		}
		switch c.Key {
		case "source.ip", "remote.ip":
			return &f.IPBlocks, &f.NotIPBlocks, true
		case "source.namespace":
			return &f.Namespaces, &f.NotNamespaces, true
		case "source.principal":
			return &f.Principals, &f.NotPrincipals, true
		}
		return nil, nil, false
	}
	for i := range rules {
		r := &rules[i]
		if c.Key == "destination.port" {
			if len(ps) > 0 && r.To != nil && len(r.To.Ports) > 0 {
				return false
			}
			continue
		}
		pos, _, ok := lists(r)
		if !ok || (len(c.Values) > 0 && len(*pos) > 0) {
			return false
		}
	}
	for i := range rules {
		r := &rules[i]
		if c.Key == "destination.port" {
			if r.To == nil {
				r.To = &Destination{}
			}
			if len(ps) > 0 {
				r.To.Ports = ps
			}
			r.To.NotPorts = append(r.To.NotPorts, nps...)
			continue
		}
		if r.From == nil {
			r.From = &Source{}
		}
		pos, neg, _ := lists(r)
		if len(c.Values) > 0 {
			*pos = slicesClone(c.Values)
		}
		*neg = append(*neg, c.NotValues...)
	}
	return true
}

// serviceAccounts turns Istio's "ns/sa" into a principal pattern that
// matches it in any trust domain. Anything else is invalid (Istio refuses
// it too): kept as written it would match no identity, which in
// notServiceAccounts would let every identity through.
func serviceAccounts(list []string, p *field.Path) ([]string, field.ErrorList) {
	var out []string
	var bad field.ErrorList
	for i, s := range list {
		ns, sa, ok := strings.Cut(s, "/")
		if !ok || ns == "" || sa == "" || strings.ContainsAny(sa, "/*") || strings.Contains(ns, "*") {
			bad = append(bad, field.Invalid(p.Index(i), s, `must be "<namespace>/<service account>"`))
			continue
		}
		out = append(out, "*/ns/"+ns+"/sa/"+sa)
	}
	return out, bad
}

func istioPorts(list []string, p *field.Path, issues field.ErrorList) ([]int32, field.ErrorList) {
	var out []int32
	for i, s := range list {
		n, err := strconv.ParseInt(s, 10, 32)
		if err != nil || n < 1 || n > 65535 {
			issues = append(issues, field.Invalid(p.Index(i), s, "must be a port number between 1 and 65535"))
			continue
		}
		out = append(out, int32(n))
	}
	return out, issues
}

func slicesClone(s []string) []string { return append([]string(nil), s...) }

func strconvQuote(s string) string { return strconv.Quote(s) }
