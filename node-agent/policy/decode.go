package policy

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation/field"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	sigsjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

// DocError is a document that could not be read at all (not YAML, or not
// an object meant for Ambit). Documents that are ours but malformed are
// not DocErrors, nor are those of our groups with a version or kind we do
// not know (a typo): they decode into an object that fails validation, so
// the Engine enforces them fail-closed and reports them with the field.
type DocError struct {
	Doc int // 1-based position in the stream
	Err error
	// Syntax: the stream itself is broken (not YAML), so the documents
	// read may be incomplete; otherwise one document was skipped.
	Syntax bool
}

func (e *DocError) Error() string { return fmt.Sprintf("document %d: %v", e.Doc, e.Err) }

// Decode reads a stream of YAML (or JSON) documents holding ambit.dev
// AuthorizationPolicy / InboundMode objects and Istio AuthorizationPolicy
// objects; "List" documents are unrolled. Empty documents are skipped.
func Decode(r io.Reader) (Set, []error) {
	var set Set
	var errs []error
	yr := utilyaml.NewYAMLReader(bufio.NewReader(r))
	for n := 1; ; n++ {
		doc, err := yr.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			errs = append(errs, &DocError{Doc: n, Err: err, Syntax: true})
			break
		}
		if len(bytes.TrimSpace(doc)) == 0 || isOnlyComments(doc) {
			n--
			continue
		}
		js, err := yaml.YAMLToJSON(doc)
		if err != nil {
			errs = append(errs, &DocError{Doc: n, Err: fmt.Errorf("not valid YAML: %v", err), Syntax: true})
			continue
		}
		if err := decodeObject(js, &set); err != nil {
			errs = append(errs, &DocError{Doc: n, Err: err})
		}
	}
	return set, errs
}

func isOnlyComments(doc []byte) bool {
	for _, l := range strings.Split(string(doc), "\n") {
		l = strings.TrimSpace(l)
		if l != "" && !strings.HasPrefix(l, "#") && l != "---" {
			return false
		}
	}
	return true
}

// DecodeObject adds one JSON object (from a file or the API server) to set.
func DecodeObject(js []byte, set *Set) error { return decodeObject(js, set) }

func decodeObject(js []byte, set *Set) error {
	head, err := readHead(js)
	if err != nil {
		return err
	}
	switch {
	case head.Kind == "List" && head.Items == nil && head.HasItems:
		return errors.New("items: not a list")
	case head.Kind == "List" || strings.HasSuffix(head.Kind, "List") && head.Items != nil:
		// Every item is read even when one is not: stopping at the
		// first bad item dropped the policies after it (a DENY among
		// them silently gone).
		var errs []error
		for i, it := range head.Items {
			if head.Kind != "List" {
				it = typedItem(it, head.APIVersion, strings.TrimSuffix(head.Kind, "List"))
			}
			if err := decodeObject(it, set); err != nil {
				errs = append(errs, fmt.Errorf("items[%d]: %w", i, err))
			}
		}
		return errors.Join(errs...)
	case head.APIVersion == APIVersion && head.Kind == KindAuthorizationPolicy:
		var p AuthorizationPolicy
		p.problems = strict(js, &p)
		p.Namespace, p.Name = head.Metadata.Namespace, head.Metadata.Name
		set.Policies = append(set.Policies, p)
	case head.APIVersion == APIVersion && head.Kind == KindInboundMode:
		var m InboundMode
		m.problems = strict(js, &m)
		m.Namespace, m.Name = head.Metadata.Namespace, head.Metadata.Name
		set.Modes = append(set.Modes, m)
	case (head.APIVersion == IstioAPIVersion || head.APIVersion == "security.istio.io/v1beta1") && head.Kind == KindAuthorizationPolicy:
		var p IstioAuthorizationPolicy
		p.problems = strict(js, &p)
		p.Namespace, p.Name = head.Metadata.Namespace, head.Metadata.Name
		set.IstioPolicies = append(set.IstioPolicies, p)
	case (head.APIVersion == IstioAPIVersion || head.APIVersion == "security.istio.io/v1beta1") && head.Kind == KindPeerAuthentication:
		var p IstioPeerAuthentication
		p.problems = strict(js, &p)
		p.Namespace, p.Name = head.Metadata.Namespace, head.Metadata.Name
		set.IstioPeerAuthentications = append(set.IstioPeerAuthentications, p)
	default:
		return unknownType(head.APIVersion, head.Kind, head.Metadata.Namespace, head.Metadata.Name, set)
	}
	return nil
}

// docHead is what decodeObject looks at before choosing a type.
type docHead struct {
	APIVersion, Kind string
	Metadata         struct{ Name, Namespace string }
	Items            []json.RawMessage
	HasItems         bool // items given and not null (Items nil then: not a list)
}

// readHead reads the type and the namespace of an object. It is lenient
// on purpose: a field of the wrong type (metadata.name: 2024) must not
// make the whole document unreadable, which skipped it; the type's
// strict decoding reports the field and the object is then enforced
// fail-closed. Keys match case-insensitively when not exact, as
// encoding/json does.
func readHead(js []byte) (docHead, error) {
	var h docHead
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(js, &obj); err != nil || obj == nil {
		return h, errors.New("not an object (want a mapping with apiVersion, kind and metadata)")
	}
	h.APIVersion, h.Kind = str(member(obj, "apiVersion")), str(member(obj, "kind"))
	var md map[string]json.RawMessage
	if json.Unmarshal(member(obj, "metadata"), &md) == nil {
		h.Metadata.Name, h.Metadata.Namespace = str(member(md, "name")), str(member(md, "namespace"))
	}
	if raw := member(obj, "items"); raw != nil && string(raw) != "null" {
		h.HasItems = true
		if json.Unmarshal(raw, &h.Items) != nil {
			h.Items = nil
		}
	}
	return h, nil
}

// member returns obj's member k: the exact key, else the first of the keys
// equal under case folding (in sorted order, so the choice is stable).
func member(obj map[string]json.RawMessage, k string) json.RawMessage {
	if v, ok := obj[k]; ok {
		return v
	}
	var found string
	for name := range obj {
		if strings.EqualFold(name, k) && (found == "" || name < found) {
			found = name
		}
	}
	if found == "" {
		return nil
	}
	return obj[found]
}

// str is raw's string value, "" when it is not a string.
func str(raw json.RawMessage) string {
	var s string
	if json.Unmarshal(raw, &s) != nil {
		return ""
	}
	return s
}

// IstioGroup is the API group of Istio's security resources.
const IstioGroup = "security.istio.io"

// istioNotL4 are the kinds of IstioGroup that decide nothing at L4, so
// skipping them (whatever their version) drops no decision Ambit makes.
var istioNotL4 = map[string]string{
	// JWT validation happens on HTTP requests (waypoints); at L4 there
	// is no token. The AuthorizationPolicies that act on its result
	// (requestPrincipals) are read, and refused visibly, on their own.
	"RequestAuthentication": "JWT validation of HTTP requests (a waypoint's job); nothing to check at L4",
}

// unknownType handles a document whose apiVersion/kind is none we read.
//
// Of one of our groups (ambit.dev, security.istio.io), or of no group
// with one of our kinds, it is almost surely a policy with a typo
// (kind: AuthorisationPolicy, apiVersion: ambit.dev/v1alpah1): skipping
// it would drop whatever it denies at the next reload. It is kept as an
// invalid AuthorizationPolicy whose spec was not read, so the Engine
// enforces it as a DENY of every workload of its namespace (mesh-wide in
// either root namespace, whichever group it was read as: it may have
// been ours or Istio's) and reports it with the field. Namespace-wide and
// not by its selector: the spec of a type we do not know is not ours to
// read, and a deny-all of the namespace covers whatever the object could
// have denied or made STRICT there.
//
// Anything else (a ConfigMap, another project's policy, an Istio kind
// with no L4 meaning) is skipped and reported with an error, as it
// cannot have been meant for Ambit.
func unknownType(apiVersion, kind, namespace, name string, set *Set) error {
	group, _, hasGroup := strings.Cut(apiVersion, "/")
	if !hasGroup && (strings.EqualFold(apiVersion, Group) || strings.EqualFold(apiVersion, IstioGroup)) {
		hasGroup = true // "apiVersion: ambit.dev": the version forgotten
	}
	istio := strings.EqualFold(group, IstioGroup)
	if why, ok := istioNotL4[kind]; ok && (istio || !hasGroup) {
		return fmt.Errorf("%s %s is not enforced by Ambit: %s", apiVersion, kind, why)
	}
	ourKind := kind == KindAuthorizationPolicy || kind == KindInboundMode || kind == KindPeerAuthentication
	ours := strings.EqualFold(group, Group) || istio || !hasGroup && ourKind
	if !ours {
		if apiVersion == "" || kind == "" {
			return errors.New("apiVersion and kind are required")
		}
		return fmt.Errorf("unsupported kind %s %s (want %s AuthorizationPolicy or InboundMode, or %s AuthorizationPolicy or PeerAuthentication)",
			apiVersion, kind, APIVersion, IstioAPIVersion)
	}
	var errs field.ErrorList
	apiPath, kindPath := field.NewPath("apiVersion"), field.NewPath("kind")
	switch {
	case istio || !hasGroup && kind == KindPeerAuthentication:
		if apiVersion != IstioAPIVersion && apiVersion != IstioGroup+"/v1beta1" {
			errs = append(errs, field.NotSupported(apiPath, apiVersion, []string{IstioAPIVersion, IstioGroup + "/v1beta1"}))
		}
		if kind != KindAuthorizationPolicy && kind != KindPeerAuthentication {
			errs = append(errs, field.NotSupported(kindPath, kind, []string{KindAuthorizationPolicy, KindPeerAuthentication}))
		}
	case hasGroup || kind == KindInboundMode:
		if apiVersion != APIVersion {
			errs = append(errs, field.NotSupported(apiPath, apiVersion, []string{APIVersion}))
		}
		if kind != KindAuthorizationPolicy && kind != KindInboundMode {
			errs = append(errs, field.NotSupported(kindPath, kind, []string{KindAuthorizationPolicy, KindInboundMode}))
		}
	default: // an AuthorizationPolicy of no group: ours or Istio's
		errs = append(errs, field.NotSupported(apiPath, apiVersion, []string{APIVersion, IstioAPIVersion}))
	}
	meta := metav1.ObjectMeta{Namespace: namespace, Name: name}
	tm := metav1.TypeMeta{APIVersion: apiVersion, Kind: kind}
	if istio || !hasGroup && kind != KindInboundMode {
		// Read as Istio's: its root namespace (istio-system) is
		// mesh-wide, so a typo there fails closed mesh-wide; the
		// Engine keeps one in ours mesh-wide too (and one of our
		// group in Istio's).
		set.IstioPolicies = append(set.IstioPolicies, IstioAuthorizationPolicy{TypeMeta: tm, ObjectMeta: meta, problems: errs, unread: true})
		return nil
	}
	set.Policies = append(set.Policies, AuthorizationPolicy{TypeMeta: tm, ObjectMeta: meta, problems: errs, unread: true})
	return nil
}

// typedItem gives an item of a typed list (AuthorizationPolicyList, as
// the API server returns it) the apiVersion and kind the API server
// leaves out of each item; items that name theirs keep them.
func typedItem(js []byte, apiVersion, kind string) []byte {
	var obj map[string]any
	if json.Unmarshal(js, &obj) != nil || obj == nil {
		return js
	}
	changed := false
	for k, v := range map[string]string{"apiVersion": apiVersion, "kind": kind} {
		if _, ok := obj[k]; !ok {
			obj[k], changed = v, true
		}
	}
	if !changed {
		return js
	}
	out, err := json.Marshal(obj)
	if err != nil {
		return js
	}
	return out
}

// strict decodes js into v and returns what did not fit as field errors.
// Unknown fields and wrong types make the object invalid (never silently
// ignored: a misspelt "notPrincipals" must not widen a policy).
func strict(js []byte, v any) field.ErrorList {
	strictErrs, err := sigsjson.UnmarshalStrict(js, v, sigsjson.DisallowDuplicateFields, sigsjson.DisallowUnknownFields)
	var out field.ErrorList
	if err != nil {
		out = append(out, field.Invalid(field.NewPath("<document>"), nil, jsonErr(err)))
	}
	for _, e := range strictErrs {
		out = append(out, field.Invalid(field.NewPath("<document>"), nil, jsonErr(e)))
	}
	return out
}

func jsonErr(err error) string {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		return fmt.Sprintf("%s: %s is the wrong type, want %s", te.Field, te.Value, te.Type)
	}
	return err.Error()
}
