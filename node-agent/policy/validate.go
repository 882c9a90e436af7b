package policy

import (
	"fmt"
	"net/netip"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/apimachinery/pkg/util/validation/field"
)

// Limits, the same as the CRD schema's, so file mode and Kubernetes mode
// refuse the same objects.
const (
	MaxRules      = 1024
	MaxListItems  = 1024
	MaxIPBlocks   = 128 // the CRD checks each with CEL; the API server bounds the cost
	MaxModePorts  = 256
	MaxPatternLen = 512
)

// ValidateAuthorizationPolicy returns every problem of p, each naming its
// field (spec.rules[2].from.ipBlocks[0]).
func ValidateAuthorizationPolicy(p *AuthorizationPolicy) field.ErrorList {
	errs := append(validateMeta(p.Name, p.Namespace), p.problems...)
	spec := field.NewPath("spec")
	errs = append(errs, validateSelector(p.Spec.Selector, spec.Child("selector"))...)
	switch p.Spec.Action {
	case "", Allow, Deny:
	default:
		errs = append(errs, field.NotSupported(spec.Child("action"), p.Spec.Action, []string{string(Allow), string(Deny)}))
	}
	if len(p.Spec.Rules) > MaxRules {
		errs = append(errs, field.TooMany(spec.Child("rules"), len(p.Spec.Rules), MaxRules))
	}
	for i := range p.Spec.Rules {
		errs = append(errs, validateRule(&p.Spec.Rules[i], spec.Child("rules").Index(i))...)
	}
	return errs
}

// ValidateInboundMode returns every problem of m, each naming its field.
func ValidateInboundMode(m *InboundMode) field.ErrorList {
	errs := append(validateMeta(m.Name, m.Namespace), m.problems...)
	spec := field.NewPath("spec")
	errs = append(errs, validateSelector(m.Spec.Selector, spec.Child("selector"))...)
	if err := validateMode(m.Spec.Mode, spec.Child("mode"), true); err != nil {
		errs = append(errs, err)
	}
	if m.Spec.Mode == "" && len(m.Spec.Ports) == 0 && !m.inherit {
		errs = append(errs, field.Required(spec.Child("mode"), "set mode, ports, or both"))
	}
	if len(m.Spec.Ports) > MaxModePorts {
		errs = append(errs, field.TooMany(spec.Child("ports"), len(m.Spec.Ports), MaxModePorts))
	}
	seen := map[int32]bool{}
	for i, pm := range m.Spec.Ports {
		p := spec.Child("ports").Index(i)
		if err := validatePort(pm.Port, p.Child("port")); err != nil {
			errs = append(errs, err)
		} else if seen[pm.Port] {
			errs = append(errs, field.Duplicate(p.Child("port"), pm.Port))
		}
		seen[pm.Port] = true
		if err := validateMode(pm.Mode, p.Child("mode"), false); err != nil {
			errs = append(errs, err)
		}
	}
	return errs
}

func validateMeta(name, namespace string) field.ErrorList {
	var errs field.ErrorList
	md := field.NewPath("metadata")
	if name == "" {
		errs = append(errs, field.Required(md.Child("name"), ""))
	} else {
		for _, msg := range validation.IsDNS1123Subdomain(name) {
			errs = append(errs, field.Invalid(md.Child("name"), name, msg))
		}
	}
	if namespace == "" {
		errs = append(errs, field.Required(md.Child("namespace"), "policies are namespaced"))
	} else {
		for _, msg := range validation.IsDNS1123Label(namespace) {
			errs = append(errs, field.Invalid(md.Child("namespace"), namespace, msg))
		}
	}
	return errs
}

func validateMode(m Mode, p *field.Path, emptyOK bool) *field.Error {
	switch m {
	case Permissive, Strict:
		return nil
	case "":
		if emptyOK {
			return nil
		}
	}
	return field.NotSupported(p, m, []string{string(Permissive), string(Strict)})
}

func validateSelector(s *Selector, p *field.Path) field.ErrorList {
	if s == nil {
		return nil
	}
	var errs field.ErrorList
	ml := p.Child("matchLabels")
	for k, v := range s.MatchLabels {
		for _, msg := range validation.IsQualifiedName(k) {
			errs = append(errs, field.Invalid(ml.Key(k), k, "key: "+msg))
		}
		for _, msg := range validation.IsValidLabelValue(v) {
			errs = append(errs, field.Invalid(ml.Key(k), v, msg))
		}
	}
	return errs
}

func validateRule(r *Rule, p *field.Path) field.ErrorList {
	var errs field.ErrorList
	if f := r.From; f != nil {
		fp := p.Child("from")
		errs = append(errs, validatePatterns(f.Principals, fp.Child("principals"))...)
		errs = append(errs, validatePatterns(f.NotPrincipals, fp.Child("notPrincipals"))...)
		errs = append(errs, validatePatterns(f.Namespaces, fp.Child("namespaces"))...)
		errs = append(errs, validatePatterns(f.NotNamespaces, fp.Child("notNamespaces"))...)
		errs = append(errs, validateBlocks(f.IPBlocks, fp.Child("ipBlocks"))...)
		errs = append(errs, validateBlocks(f.NotIPBlocks, fp.Child("notIpBlocks"))...)
	}
	if t := r.To; t != nil {
		tp := p.Child("to")
		errs = append(errs, validatePorts(t.Ports, tp.Child("ports"))...)
		errs = append(errs, validatePorts(t.NotPorts, tp.Child("notPorts"))...)
	}
	return errs
}

func validatePatterns(list []string, p *field.Path) field.ErrorList {
	var errs field.ErrorList
	if len(list) > MaxListItems {
		errs = append(errs, field.TooMany(p, len(list), MaxListItems))
	}
	for i, s := range list {
		if _, err := parsePattern(s); err != nil {
			errs = append(errs, field.Invalid(p.Index(i), s, err.Error()))
		}
	}
	return errs
}

func validateBlocks(list []string, p *field.Path) field.ErrorList {
	var errs field.ErrorList
	if len(list) > MaxIPBlocks {
		errs = append(errs, field.TooMany(p, len(list), MaxIPBlocks))
	}
	for i, s := range list {
		if _, err := parseBlock(s); err != nil {
			errs = append(errs, field.Invalid(p.Index(i), s, err.Error()))
		}
	}
	return errs
}

func validatePorts(list []int32, p *field.Path) field.ErrorList {
	var errs field.ErrorList
	if len(list) > MaxListItems {
		errs = append(errs, field.TooMany(p, len(list), MaxListItems))
	}
	for i, port := range list {
		if err := validatePort(port, p.Index(i)); err != nil {
			errs = append(errs, err)
		}
	}
	return errs
}

func validatePort(port int32, p *field.Path) *field.Error {
	if port < 1 || port > 65535 {
		return field.Invalid(p, port, "must be a port number between 1 and 65535")
	}
	return nil
}

// patternKind says how a principal or namespace pattern matches.
type patternKind uint8

const (
	matchExact patternKind = iota
	matchPrefix
	matchSuffix
	matchAny
)

type pattern struct {
	kind patternKind
	s    string
}

func (p pattern) match(v string) bool {
	switch p.kind {
	case matchExact:
		return v == p.s
	case matchPrefix:
		return strings.HasPrefix(v, p.s)
	case matchSuffix:
		return strings.HasSuffix(v, p.s)
	default:
		return true
	}
}

// parsePattern accepts "exact", "prefix*", "*suffix" and "*". A leading
// "spiffe://" is dropped so both Istio's and SPIFFE's spelling work.
func parsePattern(s string) (pattern, error) {
	switch {
	case s == "":
		return pattern{}, fmt.Errorf("must not be empty")
	case len(s) > MaxPatternLen:
		return pattern{}, fmt.Errorf("longer than %d characters", MaxPatternLen)
	case strings.ContainsAny(s, " \t\r\n"):
		return pattern{}, fmt.Errorf("must not contain white space")
	case s == "*":
		return pattern{kind: matchAny}, nil
	}
	s = strings.TrimPrefix(s, "spiffe://")
	inner := s
	kind := matchExact
	switch {
	case strings.HasPrefix(s, "*"):
		kind, inner = matchSuffix, s[1:]
	case strings.HasSuffix(s, "*"):
		kind, inner = matchPrefix, s[:len(s)-1]
	}
	if inner == "" || strings.Contains(inner, "*") {
		return pattern{}, fmt.Errorf(`"*" is allowed only alone, as the first or as the last character`)
	}
	return pattern{kind: kind, s: inner}, nil
}

// parseBlock accepts a CIDR or a single address.
func parseBlock(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("not a CIDR: %v", err)
		}
		if p.Addr().Zone() != "" {
			return netip.Prefix{}, fmt.Errorf("zones are not allowed")
		}
		if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(a.Unmap(), p.Bits()-96)
		}
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("not an IP address or CIDR")
	}
	if a.Zone() != "" {
		return netip.Prefix{}, fmt.Errorf("zones are not allowed")
	}
	a = a.Unmap()
	return netip.PrefixFrom(a, a.BitLen()), nil
}
