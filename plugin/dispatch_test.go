package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
)

// The dispatcher replaced skel.PluginMainFuncs; these tests run both on
// the same environment and stdin and require the same outcome: error
// (code, message, details), which command ran with which arguments, and
// stdout/stderr. skel is linked into the tests only.

// dispatchCase is one exec: the CNI_* variables, stdin, and what the
// command returns if it runs.
type dispatchCase struct {
	env   map[string]string
	stdin []byte
	ret   error
}

type outcome struct {
	err            *types.Error
	called         string
	args           cmdArgs
	stdout, stderr string
}

func (o outcome) String() string {
	e := "<nil>"
	if o.err != nil {
		e = fmt.Sprintf("{%d %q %q}", o.err.Code, o.err.Msg, o.err.Details)
	}
	return fmt.Sprintf("err %s called %q args %+v stdout %q stderr %q", e, o.called, o.args, o.stdout, o.stderr)
}

var cniVars = []string{"CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH", "CNI_NETNS_OVERRIDE"}

func recorder(o *outcome, ret error) func(string) func(*cmdArgs) error {
	return func(name string) func(*cmdArgs) error {
		return func(a *cmdArgs) error {
			o.called, o.args = name, *a
			return ret
		}
	}
}

func runOurs(c dispatchCase, stdin io.Reader) outcome {
	var o outcome
	var stdout, stderr bytes.Buffer
	rec := recorder(&o, c.ret)
	d := &dispatcher{getenv: func(k string) string { return c.env[k] }, stdin: stdin, stdout: &stdout, stderr: &stderr}
	o.err = d.run(cniFuncs{Add: rec("ADD"), Del: rec("DEL"), Check: rec("CHECK"), GC: rec("GC"), Status: rec("STATUS")})
	o.stdout, o.stderr = stdout.String(), stderr.String()
	return o
}

// runSkel runs skel's dispatcher on the same input. It reads the
// process's environment and standard files, so they are swapped for the
// call.
func runSkel(t testing.TB, c dispatchCase, stdin *os.File) outcome {
	dir := t.TempDir()
	for _, k := range cniVars {
		old, had := os.LookupEnv(k)
		if err := os.Setenv(k, c.env[k]); err != nil {
			t.Fatal(err)
		}
		defer func() {
			if had {
				os.Setenv(k, old)
			} else {
				os.Unsetenv(k)
			}
		}()
	}
	out, _ := os.Create(filepath.Join(dir, "stdout"))
	errf, _ := os.Create(filepath.Join(dir, "stderr"))
	defer out.Close()
	defer errf.Close()
	oldIn, oldOut, oldErr := os.Stdin, os.Stdout, os.Stderr
	os.Stdin, os.Stdout, os.Stderr = stdin, out, errf
	var o outcome
	rec := recorder(&o, c.ret)
	call := func(name string) func(*skel.CmdArgs) error {
		return func(a *skel.CmdArgs) error {
			return rec(name)(&cmdArgs{ContainerID: a.ContainerID, Netns: a.Netns, IfName: a.IfName, Args: a.Args,
				Path: a.Path, NetnsOverride: a.NetnsOverride, StdinData: a.StdinData})
		}
	}
	o.err = skel.PluginMainFuncsWithError(skel.CNIFuncs{Add: call("ADD"), Del: call("DEL"), Check: call("CHECK"), GC: call("GC"), Status: call("STATUS")},
		version.PluginSupports(supportedVersions...), about)
	os.Stdin, os.Stdout, os.Stderr = oldIn, oldOut, oldErr
	b, _ := os.ReadFile(out.Name())
	o.stdout = string(b)
	b, _ = os.ReadFile(errf.Name())
	o.stderr = string(b)
	return o
}

// compare runs both and fails on any difference but one: with CNI_NETNS
// naming the plugin's own netns, skel runs ADD/DEL and then fails; ours
// fails without running it (same error, unless skel's command failed
// first).
func compare(t *testing.T, c dispatchCase) outcome {
	t.Helper()
	dir := t.TempDir()
	in := filepath.Join(dir, "stdin")
	if err := os.WriteFile(in, c.stdin, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(in)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	want := runSkel(t, c, f)
	got := runOurs(c, bytes.NewReader(c.stdin))
	if got.err != nil && got.err.Msg == "plugin's netns and netns from CNI_NETNS should not be the same" && got.called == "" &&
		(want.called == "ADD" || want.called == "DEL") {
		if want.err == nil || (want.err.Msg != got.err.Msg && c.ret == nil) {
			t.Fatalf("own netns: skel %v, ours %v", want, got)
		}
		return got
	}
	if got.String() != want.String() {
		t.Fatalf("env %q stdin %q ret %v:\nskel %v\nours %v", c.env, c.stdin, c.ret, want, got)
	}
	return got
}

func baseEnv(cmd string) map[string]string {
	return map[string]string{"CNI_COMMAND": cmd, "CNI_CONTAINERID": "ctr-1", "CNI_NETNS": "/nonexistent/netns",
		"CNI_IFNAME": "eth0", "CNI_ARGS": "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b", "CNI_PATH": "/opt/cni/bin"}
}

func with(env map[string]string, kv ...string) map[string]string {
	out := map[string]string{}
	for k, v := range env {
		out[k] = v
	}
	for i := 0; i < len(kv); i += 2 {
		out[kv[i]] = kv[i+1]
	}
	return out
}

func TestDispatchMatchesSkel(t *testing.T) {
	conf := func(v string) []byte { return []byte(`{"cniVersion":"` + v + `","name":"net-1","type":"ambit-cni"}`) }
	notNS := filepath.Join(t.TempDir(), "plain-file")
	os.WriteFile(notNS, nil, 0o600)
	type tc struct {
		name string
		c    dispatchCase
		// checked on our outcome, besides equality with skel
		code   uint
		msg    string
		called string
	}
	cases := []tc{
		{name: "ADD", c: dispatchCase{env: baseEnv("ADD"), stdin: conf("1.0.0")}, called: "ADD"},
		{name: "DEL", c: dispatchCase{env: baseEnv("DEL"), stdin: conf("1.0.0")}, called: "DEL"},
		{name: "DEL without netns", c: dispatchCase{env: with(baseEnv("DEL"), "CNI_NETNS", ""), stdin: conf("1.0.0")}, called: "DEL"},
		{name: "CHECK", c: dispatchCase{env: baseEnv("CHECK"), stdin: conf("1.0.0")}, called: "CHECK"},
		{name: "GC", c: dispatchCase{env: with(baseEnv("GC"), "CNI_CONTAINERID", "", "CNI_NETNS", "", "CNI_IFNAME", ""), stdin: conf("1.1.0")}, called: "GC"},
		{name: "STATUS", c: dispatchCase{env: with(baseEnv("STATUS"), "CNI_CONTAINERID", "", "CNI_IFNAME", ""), stdin: conf("1.1.0")}, called: "STATUS"},
		{name: "VERSION", c: dispatchCase{env: map[string]string{"CNI_COMMAND": "VERSION"}, stdin: []byte("not even JSON")}},
		{name: "command missing", c: dispatchCase{env: with(baseEnv(""), "CNI_PATH", "")}},
		{name: "unknown command", c: dispatchCase{env: baseEnv("FROB"), stdin: conf("1.0.0")}, code: types.ErrInvalidEnvironmentVariables, msg: "unknown CNI_COMMAND: FROB"},
		{name: "lower-case command", c: dispatchCase{env: baseEnv("add"), stdin: conf("1.0.0")}, code: types.ErrInvalidEnvironmentVariables, msg: "unknown CNI_COMMAND: add"},
		{name: "unknown command, bad version", c: dispatchCase{env: baseEnv("FROB"), stdin: []byte(`{"name":"n","cniVersion":1}`)}, code: types.ErrInvalidEnvironmentVariables, msg: "unknown CNI_COMMAND"},
		{name: "unknown command, bad JSON", c: dispatchCase{env: baseEnv("FROB"), stdin: []byte(`{`)}, code: types.ErrDecodingFailure, msg: "error unmarshall network config"},
		{name: "ADD missing vars", c: dispatchCase{env: map[string]string{"CNI_COMMAND": "ADD"}, stdin: conf("1.0.0")},
			code: types.ErrInvalidEnvironmentVariables, msg: "required env variables [CNI_CONTAINERID,CNI_NETNS,CNI_IFNAME,CNI_PATH] missing"},
		{name: "DEL missing vars", c: dispatchCase{env: map[string]string{"CNI_COMMAND": "DEL"}, stdin: conf("1.0.0")},
			code: types.ErrInvalidEnvironmentVariables, msg: "required env variables [CNI_CONTAINERID,CNI_IFNAME,CNI_PATH] missing"},
		{name: "GC missing path", c: dispatchCase{env: map[string]string{"CNI_COMMAND": "GC"}, stdin: conf("1.1.0")},
			code: types.ErrInvalidEnvironmentVariables, msg: "required env variables [CNI_PATH] missing"},
		{name: "bad container ID", c: dispatchCase{env: with(baseEnv("ADD"), "CNI_CONTAINERID", "-ctr"), stdin: conf("1.0.0")},
			code: types.ErrInvalidEnvironmentVariables, msg: "invalid characters in containerID"},
		{name: "container ID with newline", c: dispatchCase{env: with(baseEnv("DEL"), "CNI_CONTAINERID", "ctr\n"), stdin: conf("1.0.0")},
			code: types.ErrInvalidEnvironmentVariables, msg: "invalid characters in containerID"},
		{name: "bad container ID wins over missing path", c: dispatchCase{env: with(baseEnv("ADD"), "CNI_CONTAINERID", "a/b", "CNI_PATH", ""), stdin: conf("1.0.0")},
			code: types.ErrInvalidEnvironmentVariables, msg: "invalid characters in containerID"},
		{name: "bad container ID not checked for GC", c: dispatchCase{env: with(baseEnv("GC"), "CNI_CONTAINERID", "a/b"), stdin: conf("1.1.0")}, called: "GC"},
		{name: "long ifname", c: dispatchCase{env: with(baseEnv("ADD"), "CNI_IFNAME", "eth0123456789012"), stdin: conf("1.0.0")},
			code: types.ErrInvalidEnvironmentVariables, msg: "interface name is too long"},
		{name: "ifname ..", c: dispatchCase{env: with(baseEnv("CHECK"), "CNI_IFNAME", ".."), stdin: conf("1.0.0")},
			code: types.ErrInvalidEnvironmentVariables, msg: "interface name is . or .."},
		{name: "ifname with colon", c: dispatchCase{env: with(baseEnv("ADD"), "CNI_IFNAME", "eth0:1"), stdin: conf("1.0.0")},
			code: types.ErrInvalidEnvironmentVariables, msg: "interface name contains"},
		{name: "ifname with unicode space", c: dispatchCase{env: with(baseEnv("ADD"), "CNI_IFNAME", "eth\u20080"), stdin: conf("1.0.0")},
			code: types.ErrInvalidEnvironmentVariables, msg: "interface name contains"},
		{name: "ifname with invalid UTF-8", c: dispatchCase{env: with(baseEnv("ADD"), "CNI_IFNAME", "eth\xff"), stdin: conf("1.0.0")}, called: "ADD"},
		{name: "malformed stdin", c: dispatchCase{env: baseEnv("ADD"), stdin: []byte(`{"cniVersion":"1.0.0",`)},
			code: types.ErrDecodingFailure, msg: "error unmarshall network config"},
		{name: "stdin not an object", c: dispatchCase{env: baseEnv("ADD"), stdin: []byte(`[1]`)}, code: types.ErrDecodingFailure, msg: "error unmarshall network config"},
		{name: "empty stdin", c: dispatchCase{env: baseEnv("ADD")}, code: types.ErrDecodingFailure, msg: "error unmarshall network config"},
		{name: "null stdin", c: dispatchCase{env: baseEnv("ADD"), stdin: []byte(`null`)}, code: types.ErrInvalidNetworkConfig, msg: "missing network name"},
		{name: "name not a string", c: dispatchCase{env: baseEnv("ADD"), stdin: []byte(`{"name":5}`)}, code: types.ErrDecodingFailure, msg: "error unmarshall network config"},
		{name: "bad network name", c: dispatchCase{env: baseEnv("DEL"), stdin: []byte(`{"name":"a b","cniVersion":"1.0.0"}`)},
			code: types.ErrInvalidNetworkConfig, msg: "invalid characters found in network name"},
		{name: "version not a string", c: dispatchCase{env: baseEnv("ADD"), stdin: []byte(`{"name":"n","cniVersion":1}`)},
			code: types.ErrDecodingFailure, msg: "decoding version from network config"},
		{name: "name and version not strings", c: dispatchCase{env: baseEnv("ADD"), stdin: []byte(`{"cniVersion":1,"name":2}`)},
			code: types.ErrDecodingFailure, msg: "error unmarshall network config"},
		{name: "no version means 0.1.0", c: dispatchCase{env: baseEnv("ADD"), stdin: []byte(`{"name":"n"}`)},
			code: types.ErrIncompatibleCNIVersion, msg: "incompatible CNI versions"},
		{name: "unsupported version", c: dispatchCase{env: baseEnv("ADD"), stdin: conf("9.9.9")}, code: types.ErrIncompatibleCNIVersion, msg: "incompatible CNI versions"},
		{name: "CHECK too old", c: dispatchCase{env: baseEnv("CHECK"), stdin: conf("0.3.1")}, code: types.ErrIncompatibleCNIVersion, msg: "config version does not allow CHECK"},
		{name: "CHECK too new", c: dispatchCase{env: baseEnv("CHECK"), stdin: conf("2.0.0")}, code: types.ErrIncompatibleCNIVersion, msg: "plugin version does not allow CHECK"},
		{name: "CHECK 1.0.1", c: dispatchCase{env: baseEnv("CHECK"), stdin: conf("1.0.1")}, code: types.ErrIncompatibleCNIVersion, msg: "incompatible CNI versions"},
		{name: "CHECK bad version", c: dispatchCase{env: baseEnv("CHECK"), stdin: conf("1.x")}, code: types.ErrDecodingFailure, msg: "failed to convert minor version"},
		{name: "GC before 1.1.0", c: dispatchCase{env: baseEnv("GC"), stdin: conf("1.0.0")}, code: types.ErrIncompatibleCNIVersion, msg: "config version does not allow GC"},
		{name: "STATUS before 1.1.0", c: dispatchCase{env: baseEnv("STATUS"), stdin: conf("0.4.0")}, code: types.ErrIncompatibleCNIVersion, msg: "config version does not allow STATUS"},
		{name: "ADD fails with CNI error", c: dispatchCase{env: baseEnv("ADD"), stdin: conf("1.0.0"), ret: types.NewError(11, "later", "d")}, code: 11, msg: "later", called: "ADD"},
		{name: "ADD fails with plain error", c: dispatchCase{env: baseEnv("ADD"), stdin: conf("1.0.0"), ret: errors.New("boom")}, code: types.ErrInternal, msg: "boom", called: "ADD"},
		{name: "ADD fails with wrapped CNI error", c: dispatchCase{env: baseEnv("ADD"), stdin: conf("1.0.0"), ret: fmt.Errorf("x: %w", types.NewError(7, "cfg", ""))}, code: 7, msg: "cfg", called: "ADD"},
		{name: "netns is a plain file", c: dispatchCase{env: with(baseEnv("ADD"), "CNI_NETNS", notNS), stdin: conf("1.0.0")}, called: "ADD"},
		{name: "own netns, override", c: dispatchCase{env: with(baseEnv("ADD"), "CNI_NETNS", "/proc/self/ns/net", "CNI_NETNS_OVERRIDE", "true"), stdin: conf("1.0.0")}, called: "ADD"},
		{name: "own netns, override 1", c: dispatchCase{env: with(baseEnv("DEL"), "CNI_NETNS", "/proc/self/ns/net", "CNI_NETNS_OVERRIDE", "1"), stdin: conf("1.0.0")}, called: "DEL"},
		{name: "CHECK in own netns is not refused", c: dispatchCase{env: with(baseEnv("CHECK"), "CNI_NETNS", "/proc/self/ns/net"), stdin: conf("1.0.0")}, called: "CHECK"},
		{name: "every variable passed through", c: dispatchCase{env: with(baseEnv("ADD"), "CNI_NETNS_OVERRIDE", "no", "CNI_ARGS", "IgnoreUnknown=1;X=y"), stdin: conf("0.3.0")}, called: "ADD"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := compare(t, c.c)
			if c.code != 0 && (got.err == nil || got.err.Code != c.code || !strings.Contains(got.err.Msg, c.msg)) {
				t.Fatalf("got %v, want code %d %q", got, c.code, c.msg)
			}
			if c.code == 0 && got.err != nil {
				t.Fatalf("got %v, want success", got)
			}
			if got.called != c.called {
				t.Fatalf("ran %q, want %q", got.called, c.called)
			}
			if c.called != "" && !bytes.Equal(got.args.StdinData, c.c.stdin) {
				t.Fatalf("command got stdin %q", got.args.StdinData)
			}
		})
	}
}

// The plugin's own netns: refused before the command runs (skel ran it
// first, then failed).
func TestDispatchOwnNetns(t *testing.T) {
	for _, cmd := range []string{"ADD", "DEL"} {
		got := compare(t, dispatchCase{env: with(baseEnv(cmd), "CNI_NETNS", "/proc/self/ns/net"),
			stdin: []byte(`{"cniVersion":"1.0.0","name":"n"}`)})
		if got.err == nil || got.err.Code != types.ErrInvalidNetNS || got.called != "" {
			t.Fatalf("%s in the plugin's netns: %v", cmd, got)
		}
	}
}

func TestDispatchVersionAndAbout(t *testing.T) {
	got := compare(t, dispatchCase{env: map[string]string{"CNI_COMMAND": "VERSION"}})
	if got.stdout != `{"cniVersion":"1.1.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}`+"\n" {
		t.Fatalf("VERSION: %q", got.stdout)
	}
	if version.Current() != specVersion {
		t.Fatalf("the CNI library speaks %s; update specVersion (%s) and check the dispatcher against its skel", version.Current(), specVersion)
	}
	got = compare(t, dispatchCase{env: map[string]string{}})
	if got.err != nil || !strings.HasPrefix(got.stderr, about+"\n") || !strings.Contains(got.stderr, "0.3.0, 0.3.1") || got.stdout != "" {
		t.Fatalf("no CNI_COMMAND: %v", got)
	}
}

// Reading stdin fails: code 5, as skel.
func TestDispatchStdinError(t *testing.T) {
	dir, err := os.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer dir.Close()
	c := dispatchCase{env: baseEnv("ADD")}
	want := runSkel(t, c, dir)
	got := runOurs(c, dir)
	if got.String() != want.String() || got.err == nil || got.err.Code != types.ErrIOFailure {
		t.Fatalf("skel %v\nours %v", want, got)
	}
}

func TestValidCNIName(t *testing.T) {
	for s, want := range map[string]bool{"": false, "a": true, "0": true, "_a": false, ".a": false, "-a": false,
		"a_b.c-d": true, "a b": false, "a\n": false, "é": false, "a/b": false, "A9": true} {
		if validCNIName(s) != want {
			t.Errorf("validCNIName(%q) = %v", s, !want)
		}
	}
}

// FuzzDispatch: for any environment and stdin, the dispatcher and skel
// agree (see compare for the one intended difference).
func FuzzDispatch(f *testing.F) {
	conf := `{"cniVersion":"1.0.0","name":"net-1"}`
	f.Add("ADD", "ctr-1", uint8(0), "eth0", "K8S_POD_NAME=x", "/bin", "", []byte(conf), uint8(0))
	f.Add("DEL", "ctr-1", uint8(1), "eth0", "", "/bin", "", []byte(conf), uint8(1))
	f.Add("CHECK", "c", uint8(2), "e", "", "/bin", "", []byte(`{"cniVersion":"0.4.0","name":"n"}`), uint8(2))
	f.Add("GC", "", uint8(0), "", "", "/bin", "", []byte(`{"cniVersion":"1.1.0","name":"n"}`), uint8(0))
	f.Add("STATUS", "", uint8(0), "", "", "/bin", "", []byte(`{"cniVersion":"1.1.0","name":"n"}`), uint8(0))
	f.Add("VERSION", "", uint8(0), "", "", "", "", []byte(nil), uint8(0))
	f.Add("", "", uint8(0), "", "", "", "", []byte(nil), uint8(0))
	f.Add("ADD", "-x", uint8(3), "a:b", "", "", "TRUE", []byte(`{"name":1}`), uint8(0))
	f.Add("DEL", "x", uint8(3), "eth0", "", "/bin", "", []byte(`{"name":"n","cniVersion":2}`), uint8(0))
	f.Fuzz(func(t *testing.T, cmd, id string, netnsSel uint8, ifname, args, path, override string, stdin []byte, retSel uint8) {
		env := map[string]string{"CNI_COMMAND": cmd, "CNI_CONTAINERID": id, "CNI_IFNAME": ifname, "CNI_ARGS": args,
			"CNI_PATH": path, "CNI_NETNS_OVERRIDE": override}
		for k, v := range env {
			if strings.ContainsRune(k+v, 0) {
				t.Skip("environment values cannot hold NUL")
			}
		}
		// Only paths that cannot block or touch anything: none, missing,
		// a plain file, the plugin's own netns.
		switch netnsSel % 4 {
		case 1:
			env["CNI_NETNS"] = "/nonexistent/netns"
		case 2:
			p := filepath.Join(t.TempDir(), "file")
			os.WriteFile(p, nil, 0o600)
			env["CNI_NETNS"] = p
		case 3:
			env["CNI_NETNS"] = "/proc/self/ns/net"
		}
		var ret error
		switch retSel % 3 {
		case 1:
			ret = types.NewError(11, "later", "")
		case 2:
			ret = errors.New("plain")
		}
		compare(t, dispatchCase{env: env, stdin: stdin, ret: ret})
	})
}
