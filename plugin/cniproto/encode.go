package cniproto

import (
	"strconv"
	"unicode/utf8"
)

// appendRequest appends r as JSON, byte for byte what json.Marshal(r)
// writes (FuzzAppendRequest checks it). Why by hand: the plugin is exec'd
// once per pod and encodes exactly one request; encoding/json would first
// build its reflection tables for Request, Pod, Attachment and
// netip.Prefix, which is most of what the encoding costs in a fresh
// process (a few page faults per exec, on every pod of the node).
func appendRequest(b []byte, r *Request) []byte {
	b = append(b, `{"version":`...)
	b = strconv.AppendInt(b, int64(r.Version), 10)
	b = append(b, `,"op":`...)
	b = appendString(b, string(r.Op))
	p := &r.Pod
	b = append(b, `,"pod":{"namespace":`...)
	b = appendString(b, p.Namespace)
	b = append(b, `,"name":`...)
	b = appendString(b, p.Name)
	if p.UID != "" {
		b = append(b, `,"uid":`...)
		b = appendString(b, p.UID)
	}
	b = append(b, `,"containerID":`...)
	b = appendString(b, p.ContainerID)
	if p.Netns != "" {
		b = append(b, `,"netns":`...)
		b = appendString(b, p.Netns)
	}
	if p.IfName != "" {
		b = append(b, `,"ifName":`...)
		b = appendString(b, p.IfName)
	}
	if len(p.IPs) > 0 {
		b = append(b, `,"ips":[`...)
		var text []byte
		for i, ip := range p.IPs {
			if i > 0 {
				b = append(b, ',')
			}
			// As encoding/json does for a TextMarshaler.
			text, _ = ip.AppendText(text[:0])
			b = appendString(b, string(text))
		}
		b = append(b, ']')
	}
	b = append(b, '}')
	if len(r.Valid) > 0 {
		b = append(b, `,"valid":[`...)
		for i, a := range r.Valid {
			if i > 0 {
				b = append(b, ',')
			}
			b = append(b, `{"containerID":`...)
			b = appendString(b, a.ContainerID)
			if a.IfName != "" {
				b = append(b, `,"ifName":`...)
				b = appendString(b, a.IfName)
			}
			b = append(b, '}')
		}
		b = append(b, ']')
	}
	if r.RuleBackend != "" {
		b = append(b, `,"ruleBackend":`...)
		b = appendString(b, string(r.RuleBackend))
	}
	if r.Network != "" {
		b = append(b, `,"network":`...)
		b = appendString(b, r.Network)
	}
	return append(b, '}')
}

// appendString is encoding/json's string encoding with HTML escaping
// (json.Marshal's default): quotes, backslash, control characters, <, >,
// &, U+2028 and U+2029 escaped; invalid UTF-8 becomes U+FFFD.
func appendString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		if c := s[i]; c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' && c != '<' && c != '>' && c != '&' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '\\', '"':
				b = append(b, '\\', c)
			case '\b':
				b = append(b, '\\', 'b')
			case '\f':
				b = append(b, '\\', 'f')
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xF])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hex[r&0xF])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
