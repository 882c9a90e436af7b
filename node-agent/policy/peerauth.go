package policy

import (
	"encoding/json"
	"slices"
	"strconv"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation/field"
)

// IstioPeerAuthentication is Istio's PeerAuthentication, read as an
// InboundMode so migrating users keep their STRICT namespaces. mtls.mode
// STRICT and PERMISSIVE map one to one, UNSET inherits, DISABLE is read as
// PERMISSIVE (enrolled pods always accept mTLS; reported as unsupported);
// portLevelMtls becomes ports. Those in Istio's root namespace are the
// mesh default, as in Istio; those in Ambit's are that namespace's default
// only, as in Istio.
type IstioPeerAuthentication struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              IstioPeerAuthenticationSpec `json:"spec"`
	Status            json.RawMessage             `json:"status,omitempty"`

	problems field.ErrorList
}

// IstioPeerAuthenticationSpec mirrors Istio's spec.
type IstioPeerAuthenticationSpec struct {
	Selector      *Selector            `json:"selector,omitempty"`
	Mtls          *IstioMTLS           `json:"mtls,omitempty"`
	PortLevelMtls map[string]IstioMTLS `json:"portLevelMtls,omitempty"`
}

// IstioMTLS is Istio's mutual TLS setting.
type IstioMTLS struct {
	Mode string `json:"mode,omitempty"`
}

// Convert translates p into an InboundMode. One that sets nothing (UNSET
// everywhere) inherits, but is kept: in Istio it still is the
// PeerAuthentication of its level when it is the oldest there, and a newer
// one of that level (PERMISSIVE, say) has no effect.
func (p *IstioPeerAuthentication) Convert() (*InboundMode, field.ErrorList) {
	var issues field.ErrorList
	spec := field.NewPath("spec")
	out := &InboundMode{ObjectMeta: p.ObjectMeta, Spec: InboundModeSpec{Selector: p.Spec.Selector}, problems: slices.Clone(p.problems)}
	out.APIVersion, out.Kind = APIVersion, KindInboundMode
	mode := func(m string, fp *field.Path) (Mode, bool) {
		switch m {
		case "", "UNSET":
			return "", true
		case "PERMISSIVE":
			return Permissive, true
		case "STRICT":
			return Strict, true
		case "DISABLE":
			issues = append(issues, field.NotSupported(fp, m, []string{"UNSET", "PERMISSIVE", "STRICT"}))
			return Permissive, true
		}
		return Mode(m), false // refused by validation: enforced as STRICT
	}
	if p.Spec.Mtls != nil {
		out.Spec.Mode, _ = mode(p.Spec.Mtls.Mode, spec.Child("mtls", "mode"))
	}
	if len(p.Spec.PortLevelMtls) > 0 && len(p.Spec.Selector.labels()) == 0 {
		// Istio refuses this ("mesh/namespace-wide PeerAuthentication
		// cannot have portLevelMtls") and would ignore the ports; taken
		// as written, a PERMISSIVE port would let plaintext in where
		// Istio refuses it. Invalid, so enforced as STRICT.
		out.problems = append(out.problems, field.Forbidden(spec.Child("portLevelMtls"),
			"namespace-wide (no selector) PeerAuthentication cannot have portLevelMtls"))
	}
	keys := make([]string, 0, len(p.Spec.PortLevelMtls))
	for k := range p.Spec.PortLevelMtls {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		fp := spec.Child("portLevelMtls").Key(k)
		n, err := strconv.ParseInt(k, 10, 32)
		if err != nil || n < 1 || n > 65535 {
			out.problems = append(out.problems, field.Invalid(fp, k, "must be a port number between 1 and 65535"))
			continue
		}
		m, _ := mode(p.Spec.PortLevelMtls[k].Mode, fp.Child("mode"))
		if m == "" {
			continue
		}
		out.Spec.Ports = append(out.Spec.Ports, PortMode{Port: int32(n), Mode: m})
	}
	out.inherit = out.Spec.Mode == "" && len(out.Spec.Ports) == 0 && len(out.problems) == 0
	return out, issues
}
