package cniproto

import (
	"encoding/json"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/plugin/redirect"
)

func goodRequest() *Request {
	return &Request{Version: Version, Op: OpAdd, Pod: Pod{Namespace: "default", Name: "web-0", UID: "u1", ContainerID: "c1",
		IPs: []netip.Prefix{netip.MustParsePrefix("10.1.0.5/24")}}}
}

func TestDecodeRequest(t *testing.T) {
	b, _ := json.Marshal(goodRequest())
	if _, err := DecodeRequest(b); err != nil {
		t.Fatalf("good request: %v", err)
	}
	gc := &Request{Version: Version, Op: OpGC, Valid: []Attachment{{ContainerID: "c1", IfName: "eth0"}}}
	b, _ = json.Marshal(gc)
	if _, err := DecodeRequest(b); err != nil {
		t.Fatalf("gc request: %v", err)
	}
	// The network's name (version 3), in any op, comes back as sent.
	for _, r := range []*Request{
		{Version: Version, Op: OpGC, Network: "net-b", Valid: []Attachment{{ContainerID: "c1", IfName: "net1"}}},
		{Version: Version, Op: OpGC, Network: "k8s-pod-network"},
		func() *Request { r := goodRequest(); r.Network = "Net_2.a-b"; return r }(),
	} {
		b, _ := json.Marshal(r)
		got, err := DecodeRequest(b)
		if err != nil || got.Network != r.Network {
			t.Fatalf("%s: %+v %v, want network %q", b, got, err, r.Network)
		}
	}
	// Only gc may pass the 64 KiB bound.
	b = append(b[:len(b)-1:len(b)-1], []byte(strings.Repeat(" ", MaxMessageSize)+"}")...)
	if _, err := DecodeRequest(b); err != nil {
		t.Fatalf("gc request of %d bytes: %v", len(b), err)
	}
	cases := map[string]string{
		"":                         "empty message",
		"{":                        "malformed",
		`{"version":4,"op":"add"}`: "protocol version 4",
		`{"version":2,"op":"gc","network":"net-b"}`:                                                                                "network needs protocol version 3",
		`{"version":3,"op":"gc","network":"-net"}`:                                                                                 "not a CNI network name",
		`{"version":3,"op":"gc","network":"net/b"}`:                                                                                "not a CNI network name",
		`{"version":3,"op":"gc","network":"` + strings.Repeat("n", 254) + `"}`:                                                     "longer than 253",
		`{"version":3,"op":"gc","network":3}`:                                                                                      "malformed",
		`{"version":1}`:                                                                                                            "no op",
		`{"version":1,"op":"add","ruleBackend":"nftables"}`:                                                                        "needs protocol version 2",
		`{"version":2,"op":"add","ruleBackend":"pf"}`:                                                                              "unknown rule backend",
		`{"version":1,"op":"zap"}`:                                                                                                 "unknown op",
		`{"version":1,"op":"add","pod":{"namespace":"a","name":"b"}}`:                                                              "containerID is empty",
		`{"version":1,"op":"add","pod":{"namespace":"a/b","name":"b","containerID":"c"}}`:                                          "pod.namespace",
		`{"version":1,"op":"add","pod":{"namespace":"a","name":"b","containerID":"c"},"x":1}`:                                      "unknown field",
		`{"version":1,"op":"add","pod":{"namespace":"a","name":"b","containerID":"c"}} {}`:                                         "trailing data",
		`{"version":1,"op":"gc","pod":{"name":"b"}}`:                                                                               "must not name a pod",
		`{"version":1,"op":"del","pod":{"namespace":"a","name":"b","containerID":"c"},"valid":[{"containerID":"c"}]}`:              "GC attachment list",
		`{"version":1,"op":"gc","valid":[{"containerID":""}]}`:                                                                     "valid[0]",
		`{"version":1,"op":"add","pod":{"namespace":"a","name":"b","containerID":"c","ips":["x"]}}`:                                "malformed",
		strings.Repeat(" ", MaxRequestSize+1):                                                                                      "exceeds the 1048576 byte limit",
		`{"version":1,"op":"del","pod":{"namespace":"a","name":"b","containerID":"c"}` + strings.Repeat(" ", MaxMessageSize) + "}": "exceeds the 65536 byte limit (only gc requests may reach 1048576)",
		strings.Repeat("x", MaxMessageSize+512):                                                                                    "malformed request of 66048 bytes, which exceeds the 65536 byte limit",
		`{"version":1,"op":"zap"` + strings.Repeat(" ", MaxMessageSize) + "}":                                                      "exceeds the 65536 byte limit",
	}
	for in, want := range cases {
		_, err := DecodeRequest([]byte(in))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("DecodeRequest(%.60q) = %v, want error containing %q", in, err, want)
		}
	}
}

func TestDecodeResponse(t *testing.T) {
	spec := redirect.DefaultSpec()
	ok := []Response{
		{Version: Version, Decision: Enroll, Redirect: &spec},
		{Version: Version, Decision: Skip},
		{Version: Version, Error: "no certificate yet", Retryable: true},
		{Version: Version, Error: "rules", Code: CodeRedirect},
		{Version: Version, Error: "removing", Code: CodeIO},
		{Version: 1, Decision: Enroll, Redirect: &spec},
	}
	for _, r := range ok {
		b, _ := json.Marshal(r)
		if _, err := DecodeResponse(b); err != nil {
			t.Errorf("%+v: %v", r, err)
		}
	}
	bad := map[string]string{
		`{"version":1,"decision":"enroll"}`: "without redirect",
		`{"version":1}`:                     "neither a decision nor an error",
		`{"version":1,"decision":"maybe"}`:  "unknown decision",
		`{"version":7,"decision":"skip"}`:   "version 7",
		`garbage`:                           "malformed agent response",
		`{"version":1,"decision":"enroll","redirect":{"outboundPort":1}}`: "bad redirect parameters",
		`{"version":2,"decision":"skip","code":102}`:                      "without an error",
		`{"version":2,"error":"x","code":101}`:                            "not one an agent may set",
		`{"version":2,"error":"x","code":7}`:                              "not one an agent may set",
		`{"version":2,"error":"x","code":200}`:                            "not one an agent may set",
	}
	for in, want := range bad {
		_, err := DecodeResponse([]byte(in))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("DecodeResponse(%q) = %v, want %q", in, err, want)
		}
	}
}

func TestSnapshotRoundTripAndVerdict(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "snap.json")
	s := &Snapshot{Version: SnapshotVersion, Generated: time.Now().UTC().Truncate(time.Second), LabelKey: "ambit.dev/dataplane-mode",
		ExcludedNamespaces: []string{"kube-system"}, AmbientNamespaces: []string{"shop"}, OptInNamespaces: []string{"mixed"}}
	if err := WriteSnapshot(path, s); err != nil {
		t.Fatal(err)
	}
	got, err := ReadSnapshot(path)
	if err != nil {
		t.Fatal(err)
	}
	if !got.Generated.Equal(s.Generated) || got.LabelKey != s.LabelKey {
		t.Fatalf("round trip: %+v", got)
	}
	for ns, want := range map[string]SnapshotVerdict{"kube-system": Excluded, "shop": MayEnroll, "mixed": MayEnroll, "other": NotEnrolled} {
		if v := got.Verdict(ns); v != want {
			t.Errorf("Verdict(%s) = %s, want %s", ns, v, want)
		}
	}
	if _, err := ReadSnapshot(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Error("missing snapshot read without error")
	}
	bad := *s
	bad.Version = 9
	if err := WriteSnapshot(path, &bad); err == nil {
		t.Error("wrote a snapshot of an unknown version")
	}
	for in, want := range map[string]string{
		`{}`:            "version 0",
		`{"version":1}`: "generated",
		`{"version":1,"generated":"2026-01-01T00:00:00Z","ambientNamespaces":["a/b"]}`: "ambientNamespaces[0]",
		`{"version":1,"generated":"2026-01-01T00:00:00Z","extra":1}`:                   "unknown field",
	} {
		if _, err := DecodeSnapshot([]byte(in)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("DecodeSnapshot(%s) = %v, want %q", in, err, want)
		}
	}
}

func FuzzDecodeRequest(f *testing.F) {
	b, _ := json.Marshal(goodRequest())
	f.Add(b)
	f.Add([]byte(`{"version":1,"op":"gc","valid":[{"containerID":"c","ifName":"eth0"}]}`))
	f.Add([]byte(`{"version":1,"op":"del","pod":{"namespace":"a","name":"b","containerID":"c","ips":["fd00::1/64"]}}`))
	f.Add([]byte(`{"version":1,"op":"add","pod":{"namespace":"","name":"b"}}`))
	f.Add([]byte("\x00\xff{"))
	// A gc of several attachments and a request padded with whitespace
	// (legal JSON). The size bounds themselves need inputs over 64 KiB,
	// which stall the fuzzer's mutation and minimisation; TestDecodeRequest
	// and large_test.go cover them.
	f.Add([]byte(`{"version":1,"op":"gc","valid":[{"containerID":"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef","ifName":"eth0"},{"containerID":"c2"},{"containerID":"c3","ifName":"net1"}]}`))
	f.Add([]byte(`{"version":1,"op":"del","pod":{"namespace":"a","name":"b","containerID":"c"}          }`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := DecodeRequest(b)
		if err != nil {
			return
		}
		// Whatever decodes must validate and survive a round trip.
		if err := r.Validate(); err != nil {
			t.Fatalf("decoded request fails validation: %v", err)
		}
		out, err := encodeRequest(r)
		if err != nil {
			t.Fatalf("re-encoding: %v", err)
		}
		if _, err := DecodeRequest(out); err != nil {
			t.Fatalf("round trip: %v", err)
		}
	})
}

func FuzzDecodeResponse(f *testing.F) {
	spec := redirect.DefaultSpec()
	b, _ := json.Marshal(Response{Version: Version, Decision: Enroll, Redirect: &spec})
	f.Add(b)
	f.Add([]byte(`{"version":1,"decision":"skip"}`))
	f.Add([]byte(`{"version":1,"error":"x","retryable":true}`))
	f.Add([]byte(`{"version":1,"decision":"enroll","redirect":{"outboundPort":15001,"inboundPort":15001}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := DecodeResponse(b)
		if err != nil {
			return
		}
		if r.Error == "" && r.Decision == Enroll && r.Redirect.Validate() != nil {
			t.Fatal("accepted an enroll answer with an invalid spec")
		}
	})
}

func FuzzDecodeSnapshot(f *testing.F) {
	f.Add([]byte(`{"version":1,"generated":"2026-01-01T00:00:00Z","labelKey":"k","excludedNamespaces":["kube-system"],"ambientNamespaces":["a"],"optInNamespaces":["b"]}`))
	f.Add([]byte(`{"version":1,"generated":"bad"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := DecodeSnapshot(b)
		if err != nil {
			return
		}
		_ = s.Verdict("default")
		if s.Validate() != nil {
			t.Fatal("decoded snapshot fails validation")
		}
	})
}
