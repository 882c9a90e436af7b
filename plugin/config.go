package main

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"reflect"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/ambit-mesh/ambit/plugin/cniproto"
	"github.com/ambit-mesh/ambit/plugin/redirectspec"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
)

// Defaults of the conflist entry; plugin/README.md documents each.
const (
	defaultLogFile      = "/var/log/ambit/cni.log"
	defaultAgentTimeout = 15 * time.Second
)

var defaultExcluded = []string{"kube-system"}

// Agent-down policies.
const (
	policySnapshot   = "snapshot"
	policyFailClosed = "fail-closed"
)

// rawConfig is the conflist entry as written; pointers tell "absent"
// from "empty" where that matters.
type rawConfig struct {
	types.PluginConf
	AgentSocket        *string   `json:"agentSocket,omitempty"`
	ExcludedNamespaces *[]string `json:"excludedNamespaces,omitempty"`
	AgentTimeout       *string   `json:"agentTimeout,omitempty"`
	LogLevel           *string   `json:"logLevel,omitempty"`
	LogFile            *string   `json:"logFile,omitempty"`
	RuleBackend        *string   `json:"ruleBackend,omitempty"`
	AgentDownPolicy    *string   `json:"agentDownPolicy,omitempty"`
	SnapshotFile       *string   `json:"snapshotFile,omitempty"`
	DefaultNamespace   *string   `json:"defaultNamespace,omitempty"`
	// PrevResult shadows PluginConf's RawPrevResult (a map, which
	// loses what the result types do not know and reformats numbers):
	// the exact bytes are what ADD prints back.
	PrevResult json.RawMessage `json:"prevResult,omitempty"`
}

// Config is the validated configuration with defaults applied.
type Config struct {
	types.PluginConf
	AgentSocket        string
	ExcludedNamespaces []string
	AgentTimeout       time.Duration
	LogLevel           slog.Level
	LogFile            string // "" = no file
	RuleBackend        redirectspec.Backend
	AgentDownPolicy    string
	SnapshotFile       string
	// DefaultNamespace is the namespace of sandboxes whose runtime names
	// the pod but has no namespaces (podman); "" leaves them unenrolled.
	DefaultNamespace string
	// Unknown lists top-level keys neither CNI nor we define; they are
	// logged, not fatal, so a runtime adding a key never breaks pods.
	Unknown []string
	// OtherCase lists keys that differ from ours only in case
	// ("AgentTimeout"): encoding/json matches keys case-insensitively,
	// so they are applied, and were logged as ignored. They are logged
	// as applied, under the name they were taken for; with both
	// spellings present the later one wins.
	OtherCase []string
	// prevJSON is prevResult exactly as the runtime sent it, when it is
	// in the configuration's cniVersion: ADD prints it back unchanged.
	prevJSON []byte
	// PrevResultErr is why a prevResult was ignored (parseConfigForDel).
	PrevResultErr error
}

var knownKeys = map[string]bool{
	// CNI spec and common runtime keys.
	"cniVersion": true, "cniVersions": true, "name": true, "type": true, "capabilities": true, "ipam": true,
	"dns": true, "prevResult": true, "runtimeConfig": true, "args": true, "cni.dev/valid-attachments": true,
	"disableCheck": true, "disableGC": true,
	// libcni (v1.2+) sends a GC's valid attachments under this key too,
	// the spec's earlier wording (its #1101); the list is read from
	// cni.dev/valid-attachments, which it always sends alongside.
	"cni.dev/attachments": true,
	// Ours.
	"agentSocket": true, "excludedNamespaces": true, "agentTimeout": true, "logLevel": true, "logFile": true,
	"ruleBackend": true, "agentDownPolicy": true, "snapshotFile": true, "defaultNamespace": true,
}

// decodedKeys are the keys rawConfig decodes (its JSON tags, PluginConf's
// included), which encoding/json also matches in another case.
var decodedKeys = func() []string {
	var out []string
	var walk func(t reflect.Type)
	walk = func(t reflect.Type) {
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			if f.Anonymous && f.Type.Kind() == reflect.Struct {
				walk(f.Type)
				continue
			}
			name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
			if name != "" && name != "-" {
				out = append(out, name)
			}
		}
	}
	walk(reflect.TypeOf(rawConfig{}))
	return out
}()

// decodedAs is the decoded key k is taken for in another case, or "".
func decodedAs(k string) string {
	for _, d := range decodedKeys {
		if strings.EqualFold(k, d) {
			return d
		}
	}
	return ""
}

func configError(field, format string, a ...any) error {
	return types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("ambit-cni config: %s: %s", field, fmt.Sprintf(format, a...)), "")
}

// parseConfig decodes and validates stdin. Every error names the field.
func parseConfig(stdin []byte) (*Config, error) { return parseConfigOpts(stdin, false) }

// parseConfigForDel is parseConfig for DEL, which has no use for
// prevResult: one that cannot be read is recorded in PrevResultErr and
// ignored, rather than failing the DEL (which would wedge the sandbox's
// teardown; SPEC.md: DEL is best effort, prevResult may be missing).
func parseConfigForDel(stdin []byte) (*Config, error) { return parseConfigOpts(stdin, true) }

func parseConfigOpts(stdin []byte, ignoreBadPrev bool) (*Config, error) {
	var raw rawConfig
	if err := json.Unmarshal(stdin, &raw); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "ambit-cni config is not valid JSON: "+decodeErrorField(err), "")
	}
	var keys map[string]json.RawMessage
	_ = json.Unmarshal(stdin, &keys)
	c := &Config{PluginConf: raw.PluginConf}
	for k := range keys {
		if knownKeys[k] {
			continue
		}
		if f := decodedAs(k); f != "" {
			c.OtherCase = append(c.OtherCase, k+" (as "+f+")")
			continue
		}
		c.Unknown = append(c.Unknown, k)
	}
	sort.Strings(c.Unknown)
	sort.Strings(c.OtherCase)

	if c.CNIVersion == "" {
		return nil, configError("cniVersion", "missing")
	}
	if raw.Type != "" && raw.Type != "ambit-cni" {
		return nil, configError("type", "is %q, want \"ambit-cni\"", raw.Type)
	}
	c.AgentSocket = cniproto.DefaultSocket
	if raw.AgentSocket != nil {
		if !strings.HasPrefix(*raw.AgentSocket, "/") || len(*raw.AgentSocket) > 107 {
			return nil, configError("agentSocket", "%q must be an absolute path of at most 107 bytes", *raw.AgentSocket)
		}
		c.AgentSocket = *raw.AgentSocket
	}
	c.ExcludedNamespaces = defaultExcluded
	if raw.ExcludedNamespaces != nil {
		c.ExcludedNamespaces = *raw.ExcludedNamespaces
		for i, ns := range c.ExcludedNamespaces {
			if ns == "" || len(ns) > 63 || strings.ContainsAny(ns, "/ \t\n\x00") {
				return nil, configError(fmt.Sprintf("excludedNamespaces[%d]", i), "%q is not a namespace name", ns)
			}
		}
	}
	c.AgentTimeout = defaultAgentTimeout
	if raw.AgentTimeout != nil {
		d, err := time.ParseDuration(*raw.AgentTimeout)
		if err != nil || d < 100*time.Millisecond || d > 5*time.Minute {
			return nil, configError("agentTimeout", "%q must be a duration between 100ms and 5m (e.g. \"15s\")", *raw.AgentTimeout)
		}
		c.AgentTimeout = d
	}
	c.LogLevel = slog.LevelInfo
	if raw.LogLevel != nil {
		if err := c.LogLevel.UnmarshalText([]byte(*raw.LogLevel)); err != nil || !slices.Contains([]string{"debug", "info", "warn", "error"}, strings.ToLower(*raw.LogLevel)) {
			return nil, configError("logLevel", "%q must be debug, info, warn or error", *raw.LogLevel)
		}
	}
	c.LogFile = defaultLogFile
	if raw.LogFile != nil {
		if *raw.LogFile != "" && !strings.HasPrefix(*raw.LogFile, "/") {
			return nil, configError("logFile", "%q must be an absolute path, or \"\" to log to stderr only", *raw.LogFile)
		}
		c.LogFile = *raw.LogFile
	}
	c.RuleBackend = redirectspec.Auto
	if raw.RuleBackend != nil {
		b, err := redirectspec.ParseBackend(*raw.RuleBackend)
		if err != nil {
			return nil, configError("ruleBackend", "%v", err)
		}
		c.RuleBackend = b
	}
	c.AgentDownPolicy = policySnapshot
	if raw.AgentDownPolicy != nil {
		switch *raw.AgentDownPolicy {
		case policySnapshot, policyFailClosed:
			c.AgentDownPolicy = *raw.AgentDownPolicy
		default:
			return nil, configError("agentDownPolicy", "%q must be \"snapshot\" or \"fail-closed\"", *raw.AgentDownPolicy)
		}
	}
	c.SnapshotFile = cniproto.DefaultSnapshotPath
	if raw.SnapshotFile != nil {
		if !strings.HasPrefix(*raw.SnapshotFile, "/") {
			return nil, configError("snapshotFile", "%q must be an absolute path", *raw.SnapshotFile)
		}
		c.SnapshotFile = *raw.SnapshotFile
	}
	if raw.DefaultNamespace != nil {
		ns := *raw.DefaultNamespace
		if ns != "" && (len(ns) > 63 || strings.ContainsAny(ns, "/ \t\n\x00")) {
			return nil, configError("defaultNamespace", "%q is not a namespace name", ns)
		}
		c.DefaultNamespace = ns
	}
	if err := c.parsePrevResult(raw.PrevResult); err != nil {
		if !ignoreBadPrev {
			return nil, err
		}
		c.PrevResult, c.prevJSON, c.PrevResultErr = nil, nil, err
	}
	return c, nil
}

// parsePrevResult reads prevResult into the CNI result types (for the pod
// IPs) and keeps its bytes when they can be printed back as they are.
func (c *Config) parsePrevResult(raw json.RawMessage) error {
	if len(raw) == 0 {
		return nil
	}
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		return configError("prevResult", "is not a JSON object: %v", decodeErrorField(err))
	}
	if len(m) == 0 {
		// null or {}: as absent, which is what the library made of it.
		return nil
	}
	// The spec has prevResult in the configuration's version (libcni
	// converts it so); only then are its bytes the answer as they are.
	// Anything else is converted by the result types, as before.
	verbatim := m["cniVersion"] == c.CNIVersion
	c.RawPrevResult = m
	if err := version.ParsePrevResult(&c.PluginConf); err != nil {
		return configError("prevResult", "cannot be parsed for cniVersion %s: %v", c.CNIVersion, err)
	}
	if verbatim {
		c.prevJSON = raw
	}
	return nil
}

// decodeErrorField turns encoding/json's messages into one naming the
// offending field where it can.
func decodeErrorField(err error) string {
	if te, ok := err.(*json.UnmarshalTypeError); ok && te.Field != "" {
		return fmt.Sprintf("field %s: expected %s, got a JSON %s", te.Field, te.Type, te.Value)
	}
	return err.Error()
}

func (c *Config) excluded(ns string) bool { return slices.Contains(c.ExcludedNamespaces, ns) }
