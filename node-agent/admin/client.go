package admin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"syscall"

	"github.com/ambit-mesh/ambit/node-agent/instance"
)

// maxAnswer bounds what the client reads: a node's few hundred pods are
// a few hundred KiB.
const maxAnswer = 32 << 20

// Target is an agent to ask.
type Target struct {
	Instance string
	Socket   string
	Ready    bool
	Stopping bool
}

// Targets picks the agents to ask among the live ones registered under
// stateDir: the one named in instanceFile (an agent's --instance-file)
// if set, every live one with all, else the newest that is not stopping
// (the one serving the node; during a surge upgrade, the new one), or
// the newest of all when every one is stopping.
func Targets(stateDir, instanceFile string, all bool) ([]Target, error) {
	target := func(e instance.Entry) Target {
		return Target{Instance: e.Name, Socket: SocketPath(stateDir, e.Name), Ready: e.Ready, Stopping: e.Stopping}
	}
	if instanceFile != "" {
		name, err := instance.ReadName(instanceFile)
		if err != nil {
			return nil, err
		}
		// The file outlives its agent (a container's /tmp across a
		// restart): a dead one is named as such, not as a socket error.
		if e, live, err := instance.Find(stateDir, name); err == nil && !live {
			return nil, fmt.Errorf("agent %s (named in %s) is not running: killed or exited, and no agent of this container has started since", name, instanceFile)
		} else if err == nil {
			return []Target{target(e)}, nil
		}
		return []Target{{Instance: name, Socket: SocketPath(stateDir, name)}}, nil
	}
	live, err := instance.List(stateDir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("no agent has run with state directory %s (wrong --state-dir or --config?)", stateDir)
		}
		return nil, err
	}
	if len(live) == 0 {
		return nil, fmt.Errorf("no agent runs with state directory %s", stateDir)
	}
	if all {
		out := make([]Target, 0, len(live))
		for _, e := range live {
			out = append(out, target(e))
		}
		return out, nil
	}
	for i := len(live) - 1; i >= 0; i-- {
		if !live[i].Stopping {
			return []Target{target(live[i])}, nil
		}
	}
	return []Target{target(live[len(live)-1])}, nil
}

// Fetch asks the agent serving socket for its Status.
func Fetch(ctx context.Context, socket string) (*Status, error) {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		DisableKeepAlives: true,
	}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://agent"+StatusPath, nil)
	if err != nil {
		return nil, err
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		switch {
		case errors.Is(err, os.ErrNotExist):
			return nil, fmt.Errorf("%s: no admin socket (an agent older than `ambit-agent status`, one still starting, or one that could not open it: its log says)", socket)
		case errors.Is(err, syscall.ECONNREFUSED):
			return nil, fmt.Errorf("%s: nothing listens on it (its agent was killed or has exited; the next agent's start removes it)", socket)
		case errors.Is(err, context.DeadlineExceeded) && ctx.Err() != nil:
			return nil, fmt.Errorf("%s: no answer in time: the agent is stuck or overloaded (its /healthz and log say more)", socket)
		}
		return nil, fmt.Errorf("%s: %w", socket, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxAnswer+1))
	if err != nil {
		return nil, fmt.Errorf("%s: reading the answer: %w", socket, err)
	}
	if len(body) > maxAnswer {
		return nil, fmt.Errorf("%s: answer larger than %d bytes", socket, maxAnswer)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s: %s: %s", socket, resp.Status, strings.TrimSpace(string(body)))
	}
	return Decode(body)
}

// Decode parses a Status strictly: this binary's own document, so a
// field it does not know, data after it (json.Unmarshal, first) or
// another version is an error rather than a picture silently missing a
// part.
func Decode(b []byte) (*Status, error) {
	var v struct {
		Version int `json:"version"`
	}
	if err := json.Unmarshal(b, &v); err != nil {
		return nil, fmt.Errorf("status: %w", err)
	}
	if v.Version != Version {
		return nil, fmt.Errorf("status: the agent answered version %d, this binary reads %d (run the agent's own binary: kubectl exec into its pod)", v.Version, Version)
	}
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	var st Status
	if err := d.Decode(&st); err != nil {
		return nil, fmt.Errorf("status: %w", err)
	}
	return &st, nil
}
