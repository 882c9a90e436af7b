package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"unicode"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
	"golang.org/x/sys/unix"
)

// This file replaces skel.PluginMainFuncs (containernetworking/cni v1.3.1)
// with the same protocol behaviour: the same required CNI_* variables per
// command, validation, error codes, messages and details, VERSION answer
// and "about" text. Why not skel: it links cni/pkg/utils, whose regexps
// are compiled at init in every exec (~18 page faults, ~0.6 ms, for two
// character-class checks), and it decodes the config twice more just for
// "name" and "cniVersion". ambit-cni runs for every pod on the node, most
// of which it does not enroll, so start-up is most of its cost.
//
// Two deliberate differences. skel reads stdin without a bound; here a
// config larger than maxStdin is refused (code 7, invalid network config,
// naming the limit) after reading maxStdin+1 bytes. And skel checks
// "CNI_NETNS is not the plugin's own netns" after ADD/DEL have run (and printed their result), so a
// runtime passing the host netns gets the host's rules changed and two
// JSON documents on stdout. Here the check runs first; the error (code 8,
// same message) is the same.
//
// dispatch_test.go compares this against skel, input by input.

// supportedVersions are the CNI spec versions ambit-cni accepts; the
// VERSION answer lists them.
var supportedVersions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}

// specVersion is the spec version the VERSION answer is written in
// (version.Current() of the CNI library we build against).
const specVersion = "1.1.0"

const about = "ambit-cni: enrolls pods into the Ambit ambient mesh"

// maxStdin bounds the network configuration read from stdin. A real one
// is a few KiB (our conflist entry, the runtime's runtimeConfig, a
// prevResult listing a pod's interfaces and addresses); 4 MiB is three
// orders of magnitude above that, so no runtime hits it, yet a runtime bug
// or a hostile caller feeding gigabytes costs the plugin at most ~2x this
// in memory instead of everything it is fed (io.ReadAll grows its buffer
// by doubling: 256 MiB of input peaked at 578 MiB RSS before the bound).
const maxStdin = 4 << 20

// cmdArgs is what the runtime passes to one exec: CNI_* variables and the
// network configuration on stdin.
type cmdArgs struct {
	ContainerID   string
	Netns         string
	IfName        string
	Args          string
	Path          string
	NetnsOverride string
	StdinData     []byte
}

// cniFuncs are the plugin's commands.
type cniFuncs struct {
	Add, Del, Check, GC, Status func(*cmdArgs) error
}

// dispatcher runs one CNI command. Its fields are the process's
// environment, stdin, stdout and stderr in production; tests substitute
// them.
type dispatcher struct {
	getenv func(string) string
	stdin  io.Reader
	stdout io.Writer
	stderr io.Writer
	// ownNetns reports whether path is the plugin's own network
	// namespace; nil uses isOwnNetns.
	ownNetns func(path string) (bool, *types.Error)
	// version is the configuration's cniVersion once run has read it
	// and found it supported: the version of the error result.
	version string
}

// Commands, as bits, so each variable can say for which it is required.
const (
	bitAdd uint8 = 1 << iota
	bitCheck
	bitDel
	bitGC
	bitStatus
)

func commandBit(cmd string) uint8 {
	switch cmd {
	case "ADD":
		return bitAdd
	case "CHECK":
		return bitCheck
	case "DEL":
		return bitDel
	case "GC":
		return bitGC
	case "STATUS":
		return bitStatus
	}
	return 0
}

// envVar is one CNI_* variable, in skel's order (which decides the order
// of names in "missing" and which validation error wins).
type envVar struct {
	name     string
	required uint8 // commands that need it set
	validate func(string) *types.Error
}

var envVars = [...]envVar{
	{"CNI_COMMAND", bitAdd | bitCheck | bitDel | bitGC | bitStatus, nil},
	{"CNI_CONTAINERID", bitAdd | bitCheck | bitDel, validateContainerID},
	{"CNI_NETNS", bitAdd | bitCheck, nil},
	{"CNI_IFNAME", bitAdd | bitCheck | bitDel, validateInterfaceName},
	{"CNI_ARGS", 0, nil},
	{"CNI_PATH", bitAdd | bitCheck | bitDel | bitGC | bitStatus, nil},
	{"CNI_NETNS_OVERRIDE", 0, nil},
}

// args reads the CNI_* variables and stdin. A missing command is an
// error like any missing variable (run turns it into the about text).
func (d *dispatcher) args() (string, *cmdArgs, *types.Error) {
	var vals [len(envVars)]string
	cmd := d.getenv("CNI_COMMAND")
	bit := commandBit(cmd)
	var missing []string
	for i, v := range envVars {
		vals[i] = d.getenv(v.name)
		switch {
		case vals[i] == "":
			if v.required&bit != 0 || i == 0 {
				missing = append(missing, v.name)
			}
		case v.required&bit != 0 && v.validate != nil:
			if err := v.validate(vals[i]); err != nil {
				return "", nil, err
			}
		}
	}
	if len(missing) > 0 {
		return "", nil, types.NewError(types.ErrInvalidEnvironmentVariables,
			fmt.Sprintf("required env variables [%s] missing", strings.Join(missing, ",")), "")
	}
	a := &cmdArgs{ContainerID: vals[1], Netns: vals[2], IfName: vals[3], Args: vals[4], Path: vals[5], NetnsOverride: vals[6]}
	if cmd == "VERSION" {
		// skel does not read stdin for VERSION.
		return cmd, a, nil
	}
	// One byte past the limit tells an oversized config from one of
	// exactly maxStdin bytes. What is left unread stays in the pipe; the
	// runtime's write fails with EPIPE once we exit, and Go's os/exec
	// (libcni) ignores that and reads our error result.
	stdin, err := io.ReadAll(io.LimitReader(d.stdin, maxStdin+1))
	if err != nil {
		return "", nil, types.NewError(types.ErrIOFailure, fmt.Sprintf("error reading from stdin: %v", err), "")
	}
	if len(stdin) > maxStdin {
		return "", nil, types.NewError(types.ErrInvalidNetworkConfig,
			fmt.Sprintf("network configuration on stdin is larger than %d MiB, ambit-cni's limit (a CNI config is a few KiB): check the conflist and what the runtime adds to it", maxStdin>>20),
			fmt.Sprintf("read %d bytes and stopped; the limit is %d bytes", len(stdin), maxStdin))
	}
	a.StdinData = stdin
	return cmd, a, nil
}

// confHeader is what the dispatcher needs from the config: skel decodes
// "name" and "cniVersion" in two passes; one suffices unless the input
// is bad, and then the two-pass path reproduces skel's exact message.
type confHeader struct {
	Name       string `json:"name"`
	CNIVersion string `json:"cniVersion"`
}

// header validates the config's name (skel does this for every command
// but VERSION) and decodes its cniVersion; a version that cannot be
// decoded is returned as verr, which only commands that look at the
// version report.
func header(stdin []byte) (confVersion string, err, verr *types.Error) {
	var h confHeader
	if json.Unmarshal(stdin, &h) != nil {
		// Bad input: decode as skel does, for its exact messages.
		var n struct {
			Name string `json:"name"`
		}
		if err := json.Unmarshal(stdin, &n); err != nil {
			return "", types.NewError(types.ErrDecodingFailure, fmt.Sprintf("error unmarshall network config: %v", err), ""), nil
		}
		if e := validateName(n.Name); e != nil {
			return "", e, nil
		}
		var v struct {
			CNIVersion string `json:"cniVersion"`
		}
		if err := json.Unmarshal(stdin, &v); err != nil {
			return "", nil, types.NewError(types.ErrDecodingFailure, fmt.Errorf("decoding version from network config: %w", err).Error(), "")
		}
		h.Name, h.CNIVersion = n.Name, v.CNIVersion
	}
	if e := validateName(h.Name); e != nil {
		return "", e, nil
	}
	if h.CNIVersion == "" {
		return "0.1.0", nil, nil // no version declared means 0.1.0
	}
	return h.CNIVersion, nil, nil
}

func validateName(name string) *types.Error {
	if name == "" {
		return types.NewError(types.ErrInvalidNetworkConfig, "missing network name", "")
	}
	if !validCNIName(name) {
		return types.NewError(types.ErrInvalidNetworkConfig, "invalid characters found in network name", name)
	}
	return nil
}

// validCNIName is skel's `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$` for container
// IDs and network names, without a regexp.
func validCNIName(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case i > 0 && (c == '_' || c == '.' || c == '-'):
		default:
			return false
		}
	}
	return s != ""
}

func validateContainerID(id string) *types.Error {
	if id == "" {
		return types.NewError(types.ErrUnknownContainer, "missing containerID", "")
	}
	if !validCNIName(id) {
		return types.NewError(types.ErrInvalidEnvironmentVariables, "invalid characters in containerID", id)
	}
	return nil
}

// validateInterfaceName follows the kernel's rules (net/core/dev.c
// dev_valid_name), as skel does.
func validateInterfaceName(name string) *types.Error {
	if name == "" {
		return types.NewError(types.ErrInvalidEnvironmentVariables, "interface name is empty", "")
	}
	if len(name) > 15 {
		return types.NewError(types.ErrInvalidEnvironmentVariables, "interface name is too long", "interface name should be less than 16 characters")
	}
	if name == "." || name == ".." {
		return types.NewError(types.ErrInvalidEnvironmentVariables, "interface name is . or ..", "")
	}
	for _, r := range name {
		if r == '/' || r == ':' || unicode.IsSpace(r) {
			return types.NewError(types.ErrInvalidEnvironmentVariables, "interface name contains / or : or whitespace characters", "")
		}
	}
	return nil
}

// run dispatches the command the environment names. nil means success
// (the command printed its result, if any).
func (d *dispatcher) run(f cniFuncs) *types.Error {
	cmd, args, err := d.args()
	if err != nil {
		if err.Code == types.ErrInvalidEnvironmentVariables && d.getenv("CNI_COMMAND") == "" {
			fmt.Fprintln(d.stderr, about)
			fmt.Fprintf(d.stderr, "CNI protocol versions supported: %s\n", strings.Join(supportedVersions, ", "))
			return nil
		}
		return err
	}
	if cmd == "VERSION" {
		if _, err := io.WriteString(d.stdout, versionAnswer()); err != nil {
			return types.NewError(types.ErrIOFailure, err.Error(), "")
		}
		return nil
	}
	confVersion, err, verr := header(args.StdinData)
	if err != nil {
		return err
	}
	if checkVersion(confVersion) == nil {
		d.version = confVersion
	}
	if verr != nil && commandBit(cmd) != 0 {
		return verr
	}
	switch cmd {
	case "ADD", "DEL":
		call := f.Add
		if cmd == "DEL" {
			call = f.Del
		}
		if err := checkVersion(confVersion); err != nil {
			return err
		}
		if o := args.NetnsOverride; strings.ToUpper(o) != "TRUE" && o != "1" {
			own := d.ownNetns
			if own == nil {
				own = isOwnNetns
			}
			if same, err := own(args.Netns); err != nil {
				return err
			} else if same {
				return types.NewError(types.ErrInvalidNetNS, "plugin's netns and netns from CNI_NETNS should not be the same", "")
			}
		}
		return callCmd(call, args)
	case "CHECK":
		return d.gated(cmd, "0.4.0", confVersion, f.Check, args)
	case "GC":
		return d.gated(cmd, "1.1.0", confVersion, f.GC, args)
	case "STATUS":
		return d.gated(cmd, "1.1.0", confVersion, f.Status, args)
	}
	return types.NewError(types.ErrInvalidEnvironmentVariables, fmt.Sprintf("unknown CNI_COMMAND: %v", cmd), "")
}

// gated runs a command that exists only from spec version min on.
func (d *dispatcher) gated(cmd, min, confVersion string, call func(*cmdArgs) error, args *cmdArgs) *types.Error {
	if ok, err := version.GreaterThanOrEqualTo(confVersion, min); err != nil {
		return types.NewError(types.ErrDecodingFailure, err.Error(), "")
	} else if !ok {
		return types.NewError(types.ErrIncompatibleCNIVersion, "config version does not allow "+cmd, "")
	}
	for _, v := range supportedVersions {
		ok, err := version.GreaterThanOrEqualTo(v, confVersion)
		if err != nil {
			return types.NewError(types.ErrDecodingFailure, err.Error(), "")
		}
		if ok {
			if err := checkVersion(confVersion); err != nil {
				return err
			}
			return callCmd(call, args)
		}
	}
	return types.NewError(types.ErrIncompatibleCNIVersion, "plugin version does not allow "+cmd, "")
}

func checkVersion(confVersion string) *types.Error {
	for _, v := range supportedVersions {
		if v == confVersion {
			return nil
		}
	}
	return types.NewError(types.ErrIncompatibleCNIVersion, "incompatible CNI versions",
		fmt.Sprintf("config is %q, plugin supports %q", confVersion, supportedVersions))
}

// callCmd runs a command; an error that is not a CNI error becomes code
// 999 (internal), as in skel.
func callCmd(call func(*cmdArgs) error, args *cmdArgs) *types.Error {
	if call == nil {
		return nil
	}
	if err := call(args); err != nil {
		var e *types.Error
		if errors.As(err, &e) {
			return e
		}
		return types.NewError(types.ErrInternal, err.Error(), "")
	}
	return nil
}

// errorResult is SPEC.md's error result. skel prints types.Error, which
// lacks cniVersion; libcni does not need it, the spec asks for it.
type errorResult struct {
	CNIVersion string `json:"cniVersion"`
	Code       uint   `json:"code"`
	Msg        string `json:"msg"`
	Details    string `json:"details,omitempty"`
}

// printError writes e as the error result on stdout, in the
// configuration's cniVersion when run got that far and it is one we
// speak, else in specVersion.
func (d *dispatcher) printError(e *types.Error) error {
	v := d.version
	if v == "" {
		v = specVersion
	}
	b, err := json.MarshalIndent(errorResult{CNIVersion: v, Code: e.Code, Msg: e.Msg, Details: e.Details}, "", "    ")
	if err != nil {
		return err
	}
	_, err = d.stdout.Write(b)
	return err
}

// versionAnswer is the VERSION output, byte for byte what skel's
// json.Encoder writes (trailing newline included).
func versionAnswer() string {
	return `{"cniVersion":"` + specVersion + `","supportedVersions":["` + strings.Join(supportedVersions, `","`) + "\"]}\n"
}

// isOwnNetns reports whether path names the network namespace the
// plugin runs in. A path that cannot be stat'ed is not ours (DEL may come
// after the runtime removed the netns; ADD reports bad paths itself).
// skel opens both and compares device and inode; stat gives the same
// without opening whatever the path names (a FIFO would block open).
// Nothing has called setns yet when this runs, so every thread is in the
// plugin's netns and the thread need not be locked (locking it made the
// runtime start a template thread: a few dozen page faults).
func isOwnNetns(path string) (bool, *types.Error) {
	var st, self unix.Stat_t
	if path == "" || unix.Stat(path, &st) != nil {
		return false, nil
	}
	if err := unix.Stat("/proc/thread-self/ns/net", &self); err != nil {
		return false, types.NewError(types.ErrInvalidNetNS, "get plugin's netns failed", "")
	}
	return st.Dev == self.Dev && st.Ino == self.Ino, nil
}
