package conflist

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
)

// MaxSize bounds the configuration files this package reads. Real ones
// are a few KiB.
const MaxSize = 1 << 20

// List is a parsed conflist with the byte offsets needed to splice it.
type List struct {
	raw        []byte
	Name       string
	CNIVersion string
	Plugins    []Plugin
	// close is the offset of the ']' that closes "plugins".
	close int
}

// Plugin is one entry of "plugins": its type and where its JSON object
// starts and ends in the file.
type Plugin struct {
	Type       string
	Start, End int
}

// Raw returns the plugin's exact bytes in l.
func (l *List) Raw(p Plugin) []byte { return l.raw[p.Start:p.End] }

// Bytes returns the file content l was parsed from.
func (l *List) Bytes() []byte { return l.raw }

// ParseList parses a conflist for splicing: a JSON object with a
// non-empty string "name" and a non-empty "plugins" array of objects each
// with a non-empty string "type". Whether a runtime would load the file
// is Loads' question (libcni's own rules); ParseList only has to find,
// in any file libcni loads, the plugins libcni sees. A key given twice
// means what it means to libcni (encoding/json): the last one counts, so
// the plugins spliced are those of the last "plugins".
func ParseList(b []byte) (*List, error) {
	if len(b) > MaxSize {
		return nil, fmt.Errorf("configuration of %d bytes exceeds the %d byte limit", len(b), MaxSize)
	}
	l := &List{raw: b, close: -1}
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber()
	if err := expectDelim(d, '{'); err != nil {
		return nil, err
	}
	pluginsAt := -1
	for d.More() {
		key, err := stringToken(d)
		if err != nil {
			return nil, err
		}
		switch key {
		case "plugins":
			var raw json.RawMessage
			if err := d.Decode(&raw); err != nil {
				return nil, fmt.Errorf("\"plugins\": %w", err)
			}
			pluginsAt = int(d.InputOffset()) - len(raw)
		case "name":
			l.Name = ""
			if err := d.Decode(&l.Name); err != nil {
				return nil, fmt.Errorf("\"name\" is not a string: %w", err)
			}
		case "cniVersion":
			l.CNIVersion = ""
			if err := d.Decode(&l.CNIVersion); err != nil {
				return nil, fmt.Errorf("\"cniVersion\" is not a string: %w", err)
			}
		default:
			var skip json.RawMessage
			if err := d.Decode(&skip); err != nil {
				return nil, fmt.Errorf("value of %q: %w", key, err)
			}
		}
	}
	if err := expectDelim(d, '}'); err != nil {
		return nil, err
	}
	if err := expectEOF(d); err != nil {
		return nil, err
	}
	if l.Name == "" {
		return nil, errors.New("no \"name\"")
	}
	if pluginsAt < 0 {
		return nil, errors.New("no \"plugins\" list")
	}
	if err := l.parsePlugins(pluginsAt); err != nil {
		return nil, err
	}
	if len(l.Plugins) == 0 {
		return nil, errors.New("\"plugins\" is empty")
	}
	return l, nil
}

// parsePlugins reads the "plugins" array that starts at offset at.
func (l *List) parsePlugins(at int) error {
	d := json.NewDecoder(bytes.NewReader(l.raw[at:]))
	d.UseNumber()
	if err := expectDelim(d, '['); err != nil {
		return fmt.Errorf("\"plugins\": %w", err)
	}
	for i := 0; d.More(); i++ {
		var raw json.RawMessage
		if err := d.Decode(&raw); err != nil {
			return fmt.Errorf("plugins[%d]: %w", i, err)
		}
		end := at + int(d.InputOffset())
		p := Plugin{Start: end - len(raw), End: end}
		typ, err := pluginType(raw)
		if err != nil {
			return fmt.Errorf("plugins[%d]: %w", i, err)
		}
		p.Type = typ
		l.Plugins = append(l.Plugins, p)
	}
	if err := expectDelim(d, ']'); err != nil {
		return fmt.Errorf("\"plugins\": %w", err)
	}
	l.close = at + int(d.InputOffset()) - 1
	if l.close < 0 || l.close >= len(l.raw) || l.raw[l.close] != ']' {
		return errors.New("internal: lost track of the end of \"plugins\"")
	}
	return nil
}

// pluginType returns the "type" of one plugin object.
func pluginType(raw []byte) (string, error) {
	if len(raw) == 0 || raw[0] != '{' {
		return "", errors.New("not a JSON object")
	}
	var p struct {
		Type json.RawMessage `json:"type"`
	}
	if err := json.Unmarshal(raw, &p); err != nil {
		return "", err
	}
	var t string
	if p.Type == nil || json.Unmarshal(p.Type, &t) != nil || t == "" {
		return "", errors.New("missing 'type'")
	}
	return t, nil
}

// Conf is a single-plugin configuration (.conf or .json).
type Conf struct {
	raw        []byte
	Name       string
	CNIVersion string
	Type       string
}

// ParseConf parses and validates a single-plugin configuration: a JSON
// object with a non-empty string "type" (libcni's rule; "name" may be
// empty). An object that has "plugins" is a list, not a conf.
func ParseConf(b []byte) (*Conf, error) {
	if len(b) > MaxSize {
		return nil, fmt.Errorf("configuration of %d bytes exceeds the %d byte limit", len(b), MaxSize)
	}
	t := bytes.TrimSpace(b)
	if len(t) == 0 || t[0] != '{' {
		return nil, errors.New("not a JSON object")
	}
	var c struct {
		Name       json.RawMessage `json:"name"`
		CNIVersion json.RawMessage `json:"cniVersion"`
		Type       json.RawMessage `json:"type"`
		Plugins    json.RawMessage `json:"plugins"`
	}
	d := json.NewDecoder(bytes.NewReader(b))
	if err := d.Decode(&c); err != nil {
		return nil, err
	}
	if err := expectEOF(d); err != nil {
		return nil, err
	}
	if c.Plugins != nil {
		return nil, errors.New("has \"plugins\": this is a conflist")
	}
	out := &Conf{raw: b}
	if err := optString(c.Name, &out.Name); err != nil {
		return nil, fmt.Errorf("\"name\": %w", err)
	}
	if err := optString(c.CNIVersion, &out.CNIVersion); err != nil {
		return nil, fmt.Errorf("\"cniVersion\": %w", err)
	}
	if err := optString(c.Type, &out.Type); err != nil || out.Type == "" {
		return nil, errors.New("missing 'type'")
	}
	return out, nil
}

func optString(raw json.RawMessage, into *string) error {
	if raw == nil || string(raw) == "null" {
		return nil
	}
	return json.Unmarshal(raw, into)
}

func expectDelim(d *json.Decoder, want json.Delim) error {
	t, err := d.Token()
	if err != nil {
		return err
	}
	if got, ok := t.(json.Delim); !ok || got != want {
		return fmt.Errorf("expected %q, found %v", string(want), t)
	}
	return nil
}

func stringToken(d *json.Decoder) (string, error) {
	t, err := d.Token()
	if err != nil {
		return "", err
	}
	s, ok := t.(string)
	if !ok {
		return "", fmt.Errorf("expected an object key, found %v", t)
	}
	return s, nil
}

func expectEOF(d *json.Decoder) error {
	if _, err := d.Token(); err != io.EOF {
		if err == nil {
			return errors.New("trailing data after the JSON object")
		}
		return err
	}
	return nil
}

// Entry is our plugin's configuration object, already encoded. Its "type"
// identifies it among the plugins.
type Entry struct {
	Type string
	JSON []byte
}

// NewEntry checks that js is an object whose "type" is a non-empty string.
func NewEntry(js []byte) (Entry, error) {
	typ, err := pluginType(bytes.TrimSpace(js))
	if err != nil {
		return Entry{}, fmt.Errorf("our entry: %w", err)
	}
	var c bytes.Buffer
	if err := json.Compact(&c, js); err != nil {
		return Entry{}, fmt.Errorf("our entry: %w", err)
	}
	return Entry{Type: typ, JSON: c.Bytes()}, nil
}

// Ensure returns b with exactly one plugin of e.Type, equal to e and last
// in the list. changed is false, and out is b itself, when b already was
// so; an entry that only differs in formatting counts as equal, so a
// repeated Ensure never rewrites the file.
func Ensure(b []byte, e Entry) (out []byte, changed bool, err error) {
	l, err := ParseList(b)
	if err != nil {
		return nil, false, err
	}
	var ours []int
	for i, p := range l.Plugins {
		if p.Type == e.Type {
			ours = append(ours, i)
		}
	}
	n := len(l.Plugins)
	if len(ours) == n {
		return nil, false, fmt.Errorf("the list holds only %s entries: it is not a primary network to chain into", e.Type)
	}
	if len(ours) == 1 && ours[0] == n-1 {
		if sameJSON(l.Raw(l.Plugins[n-1]), e.JSON) {
			return b, false, nil
		}
		// Replace in place, formatted as an insert would, so Remove
		// still restores the original bytes.
		p := l.Plugins[n-1]
		ind := entryIndent(b, l.Plugins[n-2])
		return splice(b, p.Start, p.End, format(e.JSON, ind)), true, nil
	}
	if len(ours) > 0 {
		if b, err = removeAll(l, e.Type); err != nil {
			return nil, false, err
		}
		if l, err = ParseList(b); err != nil {
			return nil, false, fmt.Errorf("internal: after removing old entries: %w", err)
		}
	}
	last := l.Plugins[len(l.Plugins)-1]
	ws := entryIndent(b, last)
	out = splice(b, last.End, last.End, append([]byte(","+ws), format(e.JSON, ws)...))
	if _, err := ParseList(out); err != nil {
		return nil, false, fmt.Errorf("internal: inserting our entry broke the list: %w", err)
	}
	return out, true, nil
}

// Remove returns b without any plugin of type typ. changed is false, and
// out is b itself, when there was none. A list that would be left with no
// plugin is refused: that file was not a primary network.
func Remove(b []byte, typ string) (out []byte, changed bool, err error) {
	l, err := ParseList(b)
	if err != nil {
		return nil, false, err
	}
	found := 0
	for _, p := range l.Plugins {
		if p.Type == typ {
			found++
		}
	}
	if found == 0 {
		return b, false, nil
	}
	if found == len(l.Plugins) {
		return nil, false, fmt.Errorf("the list holds only %s entries; removing them would leave no network", typ)
	}
	out, err = removeAll(l, typ)
	if err != nil {
		return nil, false, err
	}
	return out, true, nil
}

// Has reports whether b is a valid list containing a plugin of type typ.
func Has(b []byte, typ string) bool {
	l, err := ParseList(b)
	if err != nil {
		return false
	}
	for _, p := range l.Plugins {
		if p.Type == typ {
			return true
		}
	}
	return false
}

func removeAll(l *List, typ string) ([]byte, error) {
	// One at a time, re-parsing in between, so every cut uses offsets of
	// the current bytes. Lists are short.
	for {
		idx := -1
		for i, p := range l.Plugins {
			if p.Type == typ {
				idx = i
			}
		}
		if idx < 0 {
			return l.raw, nil
		}
		p := l.Plugins[idx]
		var b []byte
		switch {
		case idx > 0:
			// ",<ws>{ours}" after the previous plugin: the exact
			// inverse of an insert.
			b = splice(l.raw, l.Plugins[idx-1].End, p.End, nil)
		case len(l.Plugins) > 1:
			b = splice(l.raw, p.Start, l.Plugins[1].Start, nil)
		default:
			return nil, errors.New("cannot remove the only plugin")
		}
		var err error
		if l, err = ParseList(b); err != nil {
			return nil, fmt.Errorf("internal: removing %s broke the list: %w", typ, err)
		}
	}
}

// entryIndent returns the whitespace that precedes p in b, which the
// inserted entry copies so it lines up with its neighbours.
func entryIndent(b []byte, p Plugin) string {
	i := p.Start
	for i > 0 && isSpace(b[i-1]) {
		i--
	}
	return string(b[i:p.Start])
}

// format lays our entry out like its neighbours: on one line when they
// share a line, otherwise indented under the same column.
func format(js []byte, ws string) []byte {
	nl := strings.LastIndexByte(ws, '\n')
	if nl < 0 {
		return js
	}
	prefix := ws[nl+1:]
	unit := "  "
	if strings.HasPrefix(prefix, "\t") {
		unit = "\t"
	}
	var buf bytes.Buffer
	if err := json.Indent(&buf, js, prefix, unit); err != nil {
		return js
	}
	if strings.Contains(ws, "\r\n") {
		return bytes.ReplaceAll(buf.Bytes(), []byte("\n"), []byte("\r\n"))
	}
	return buf.Bytes()
}

func isSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }

func splice(b []byte, from, to int, with []byte) []byte {
	out := make([]byte, 0, len(b)-(to-from)+len(with))
	out = append(out, b[:from]...)
	out = append(out, with...)
	return append(out, b[to:]...)
}

func sameJSON(a, b []byte) bool {
	var ca, cb bytes.Buffer
	if json.Compact(&ca, a) != nil || json.Compact(&cb, b) != nil {
		return false
	}
	return bytes.Equal(ca.Bytes(), cb.Bytes())
}

// Convert turns a single-plugin configuration into an equivalent
// conflist whose only plugin is the original object, byte for byte, with
// the list's name and cniVersion taken from it (libcni's ConfListFromConf
// does the same in memory). The list says "loadOnlyInlinedPlugins": a
// runtime never loads the network's drop-in plugins (libcni v1.3.0+,
// <dir>/<name>/*.conf) for a single-plugin file, and the conversion must
// not start running them (after ambit-cni); older libcni ignores the key.
func Convert(b []byte) ([]byte, error) {
	return convert(b, true)
}

// inlinedOnlyLine is the line Convert adds since the drop-in handling;
// agents before it converted without.
const inlinedOnlyLine = "  \"loadOnlyInlinedPlugins\": true,\n"

// IsConversion reports whether list is exactly what Convert makes of
// orig, or what agents before "loadOnlyInlinedPlugins" made of it (the
// same without that line): a list converted by an older agent must still
// be recognised, or an uninstall after an upgrade would leave the node on
// the list with the original stranded in the backup.
func IsConversion(list, orig []byte) bool {
	for _, inlinedOnly := range []bool{true, false} {
		if c, err := convert(orig, inlinedOnly); err == nil && bytes.Equal(c, list) {
			return true
		}
	}
	return false
}

func convert(b []byte, inlinedOnly bool) ([]byte, error) {
	c, err := ParseConf(b)
	if err != nil {
		return nil, err
	}
	name := c.Name
	if name == "" {
		// A list needs a name; libcni would use "" and then refuse it.
		name = c.Type
	}
	var buf bytes.Buffer
	buf.WriteString("{\n")
	if c.CNIVersion != "" {
		v, _ := json.Marshal(c.CNIVersion)
		fmt.Fprintf(&buf, "  \"cniVersion\": %s,\n", v)
	}
	n, _ := json.Marshal(name)
	fmt.Fprintf(&buf, "  \"name\": %s,\n", n)
	if inlinedOnly {
		buf.WriteString(inlinedOnlyLine)
	}
	buf.WriteString("  \"plugins\": [\n    ")
	buf.Write(bytes.TrimSpace(b))
	buf.WriteString("\n  ]\n}\n")
	out := buf.Bytes()
	if _, err := ParseList(out); err != nil {
		return nil, fmt.Errorf("internal: converted list does not parse: %w", err)
	}
	return out, nil
}
