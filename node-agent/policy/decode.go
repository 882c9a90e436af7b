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
// an object we know). Documents that are ours but malformed are not
// DocErrors: they decode into an object that fails validation, so the
// Engine enforces them fail-closed and reports them with the field.
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
	var head struct {
		metav1.TypeMeta `json:",inline"`
		Metadata        struct {
			Name      string `json:"name"`
			Namespace string `json:"namespace"`
		} `json:"metadata"`
		Items []json.RawMessage `json:"items"`
	}
	if err := json.Unmarshal(js, &head); err != nil {
		return fmt.Errorf("not an object: %v", err)
	}
	switch {
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
	case head.APIVersion == "" || head.Kind == "":
		return errors.New("apiVersion and kind are required")
	default:
		return fmt.Errorf("unsupported kind %s %s (want %s AuthorizationPolicy or InboundMode, or %s AuthorizationPolicy or PeerAuthentication)",
			head.APIVersion, head.Kind, APIVersion, IstioAPIVersion)
	}
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
