package agent

import (
	"strings"
	"syscall"
	"testing"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// TestAddRefusesTheAgentsOwnNetns: the agent runs in the node's network
// namespace (hostNetwork); capture rules installed there would send the
// node's own TCP to port 15001. ambit-cni refuses a CNI_NETNS that is its
// own namespace, and the decision skips hostNetwork pods, but the agent
// relied on both: an ADD whose fd is the agent's own namespace (a
// CNI_NETNS_OVERRIDE runtime, a view wrong about hostNetwork) was
// enrolled. Now it is refused, naming the node's namespace, and nothing
// is installed. (The test makes a pod's namespace stand for the agent's
// own: running the unfixed code on this machine's real one would capture
// its TCP.)
func TestAddRefusesTheAgentsOwnNetns(t *testing.T) {
	testenv.RequireRoot(t)
	web := newNetns(t, "10.89.12.2/24")
	var st syscall.Stat_t
	if err := syscall.Fstat(int(web.file.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	h := startAgent(t, "", invAmbient, func(o *Options) { o.ownNetnsIno = st.Ino })
	resp, err := h.call(cniproto.OpAdd, "apps", "web", "cid-web", web, "10.89.12.2/24")
	if err != nil {
		t.Fatal(err)
	}
	if resp.Error == "" || !strings.Contains(resp.Error, "the agent's own network namespace") {
		t.Fatalf("ADD with the agent's own netns: %+v, want an error naming it", resp)
	}
	if got := installed(t, web); len(got) != 0 {
		t.Errorf("rules installed in the agent's own netns: %v", got)
	}
	if p := h.podNow("apps/web"); p != nil && p.enrolled() {
		t.Errorf("apps/web served in the agent's own netns")
	}
}
