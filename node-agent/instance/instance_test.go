package instance

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestSuccessorLifecycle(t *testing.T) {
	dir := t.TempDir()
	old, err := Register(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	if p, ok := old.Successor(); ok {
		t.Fatalf("lone agent sees a successor %+v", p)
	}
	old.SetReady()
	time.Sleep(time.Microsecond) // distinct start times even on coarse clocks
	neu, err := Register(dir)
	if err != nil {
		t.Fatal(err)
	}
	if neu.Name() <= old.Name() {
		t.Fatalf("names do not sort by start: %s then %s", old.Name(), neu.Name())
	}
	p, ok := old.Successor()
	if !ok || p.Name != neu.Name() || p.Ready {
		t.Fatalf("old agent sees %+v %v, want the new one, not ready", p, ok)
	}
	if p, ok := neu.Successor(); ok {
		t.Fatalf("the newest agent sees a successor %+v (its predecessor?)", p)
	}
	neu.SetReady()
	if p, ok := old.Successor(); !ok || !p.Ready {
		t.Fatalf("after SetReady the old agent sees %+v %v, want ready", p, ok)
	}
	neu.Close()
	if p, ok := old.Successor(); ok {
		t.Fatalf("after the new agent closed the old one still sees %+v", p)
	}
	ents, _ := os.ReadDir(filepath.Join(dir, Dir))
	if len(ents) != 2 { // old's entry and its .ready
		t.Fatalf("entries left: %v", ents)
	}
}

// A successor killed with SIGKILL (no chance to clean up) stops counting
// at once, and its files are removed by whoever looks.
func TestKilledSuccessorIsPruned(t *testing.T) {
	dir := t.TempDir()
	old, err := Register(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "AMBIT_INSTANCE_HELPER="+dir)
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		cmd.Process.Kill()
		t.Fatalf("helper: %v", err)
	}
	child := strings.TrimSpace(line)
	p, ok := old.Successor()
	if !ok || p.Name != child || !p.Ready {
		cmd.Process.Kill()
		t.Fatalf("old agent sees %+v %v, want the child %s, ready", p, ok, child)
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	if p, ok := old.Successor(); ok {
		t.Fatalf("a killed agent still counts: %+v", p)
	}
	for _, n := range []string{child, child + readySuffix} {
		if _, err := os.Stat(filepath.Join(dir, Dir, n)); !os.IsNotExist(err) {
			t.Errorf("%s of the killed agent left behind (err %v)", n, err)
		}
	}
}

// Prune also removes dead predecessors (a node whose agents were killed
// again and again does not pile up entries) and stray ready markers.
func TestPruneDeadPredecessors(t *testing.T) {
	dir := t.TempDir()
	reg := filepath.Join(dir, Dir)
	os.MkdirAll(reg, 0o755)
	for _, n := range []string{"00000000000000000001-dead", "00000000000000000001-dead.ready", "00000000000000000002-gone.ready"} {
		os.WriteFile(filepath.Join(reg, n), nil, 0o644)
	}
	s, err := Register(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.Prune()
	ents, _ := os.ReadDir(reg)
	if len(ents) != 1 || ents[0].Name() != s.Name() {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Fatalf("after Prune: %v, want only %s", names, s.Name())
	}
}

// TestMain doubles as the child of TestKilledSuccessorIsPruned: with
// AMBIT_INSTANCE_HELPER set it registers, marks itself ready, prints its
// name and waits to be killed.
func TestMain(m *testing.M) {
	dir := os.Getenv("AMBIT_INSTANCE_HELPER")
	if dir == "" {
		os.Exit(m.Run())
	}
	time.Sleep(time.Millisecond)
	s, err := Register(dir)
	if err != nil {
		os.Stderr.WriteString(err.Error() + "\n")
		os.Exit(1)
	}
	s.SetReady()
	os.Stdout.WriteString(s.Name() + "\n")
	time.Sleep(time.Minute)
	os.Exit(0)
}

// Probe answers for one process: not before it is ready, and never for a
// dead predecessor whose name file survived in the container's /tmp.
func TestProbe(t *testing.T) {
	dir := t.TempDir()
	nameFile := filepath.Join(t.TempDir(), "instance")
	if err := Probe(dir, nameFile); err == nil {
		t.Fatal("probe passes before any agent registered")
	}
	s, err := Register(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.WriteName(nameFile); err != nil {
		t.Fatal(err)
	}
	if err := Probe(dir, nameFile); err == nil || !strings.Contains(err.Error(), "starting") {
		t.Fatalf("probe of a starting agent: %v", err)
	}
	s.SetReady()
	if err := Probe(dir, nameFile); err != nil {
		t.Fatalf("probe of a ready agent: %v", err)
	}
	// Killed without cleanup: the lock is gone, the files stay.
	s.f.Close()
	if err := Probe(dir, nameFile); err == nil || !strings.Contains(err.Error(), "not running") {
		t.Fatalf("probe of a dead agent: %v", err)
	}
	os.WriteFile(nameFile, []byte("../../etc\n"), 0o644)
	if err := Probe(dir, nameFile); err == nil || !strings.Contains(err.Error(), "bad instance name") {
		t.Fatalf("probe with a hostile name: %v", err)
	}
}

// TestReadySuccessorWithThreeAgents: a rollout started during a surge. The
// oldest agent's Successor is the newest (still starting), its
// ReadySuccessor the middle one, which is ready.
func TestReadySuccessorWithThreeAgents(t *testing.T) {
	dir := t.TempDir()
	var agents [3]*Self
	for i := range agents {
		s, err := Register(dir)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		agents[i] = s
		time.Sleep(time.Microsecond) // distinct start times
	}
	oldest, mid, newest := agents[0], agents[1], agents[2]
	if p, ok := oldest.ReadySuccessor(); ok {
		t.Fatalf("no newer agent ready, ReadySuccessor %+v", p)
	}
	mid.SetReady()
	if p, ok := oldest.Successor(); !ok || p.Name != newest.Name() || p.Ready {
		t.Fatalf("oldest's Successor %+v %v, want the newest, not ready", p, ok)
	}
	if p, ok := oldest.ReadySuccessor(); !ok || p.Name != mid.Name() || !p.Ready {
		t.Fatalf("oldest's ReadySuccessor %+v %v, want the middle agent", p, ok)
	}
	if p, ok := mid.ReadySuccessor(); ok {
		t.Fatalf("middle agent's ReadySuccessor %+v, want none (the newest is not ready)", p)
	}
	newest.SetReady()
	if p, ok := oldest.ReadySuccessor(); !ok || p.Name != newest.Name() {
		t.Fatalf("all ready: oldest's ReadySuccessor %+v %v, want the newest", p, ok)
	}
	newest.Close()
	if p, ok := oldest.ReadySuccessor(); !ok || p.Name != mid.Name() {
		t.Fatalf("newest gone: oldest's ReadySuccessor %+v %v, want the middle agent", p, ok)
	}
}

// A ready successor that begins shutting down is no one's successor any
// more, although it stays alive (locked) while it drains: the older agent
// is the newest again at once, and the stopping agent's own startup
// probe fails.
func TestStoppingSuccessorStopsCounting(t *testing.T) {
	dir := t.TempDir()
	old, err := Register(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	old.SetReady()
	time.Sleep(time.Microsecond)
	neu, err := Register(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer neu.Close()
	neu.SetReady()
	nameFile := filepath.Join(t.TempDir(), "name")
	neu.WriteName(nameFile)
	if _, ok := old.ReadySuccessor(); !ok {
		t.Fatal("ready successor not seen")
	}
	if err := neu.Stopping(); err != nil {
		t.Fatal(err)
	}
	if p, ok := old.Successor(); ok {
		t.Fatalf("a stopping agent still counts as a successor: %+v", p)
	}
	if p, ok := old.ReadySuccessor(); ok {
		t.Fatalf("a stopping agent still counts as a ready successor: %+v", p)
	}
	if _, err := os.Stat(filepath.Join(dir, Dir, neu.Name()+readySuffix)); !os.IsNotExist(err) {
		t.Fatalf("the stopping agent's ready marker is still there (agents before the stopping mark read only it): %v", err)
	}
	if !alive(filepath.Join(dir, Dir, neu.Name())) {
		t.Fatal("the stopping agent's entry is taken for a dead one")
	}
	if err := Probe(dir, nameFile); err == nil || !strings.Contains(err.Error(), "stopping") {
		t.Fatalf("startup probe of a stopping agent: %v", err)
	}
	neu.SetReady() // a late readiness (the ready signal racing SIGTERM) does not undo it
	if _, ok := old.ReadySuccessor(); ok {
		t.Fatal("SetReady after Stopping made the agent a ready successor again")
	}
	old.Prune()
	if _, err := os.Stat(filepath.Join(dir, Dir, neu.Name())); err != nil {
		t.Fatalf("Prune removed a stopping (live) agent's entry: %v", err)
	}
	neu.Close()
	ents, _ := os.ReadDir(filepath.Join(dir, Dir))
	if len(ents) != 2 { // old's entry and its .ready
		t.Fatalf("entries left: %v", ents)
	}
}

// TestServingPredecessor: a starting agent leaves the plugin socket to an
// older agent only while that one serves (live, ready, not stopping).
func TestServingPredecessor(t *testing.T) {
	dir := t.TempDir()
	old, err := Register(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	time.Sleep(time.Microsecond)
	neu, err := Register(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer neu.Close()
	if neu.ServingPredecessor() {
		t.Fatal("an older agent that is not ready yet counts as serving")
	}
	old.SetReady()
	if !neu.ServingPredecessor() {
		t.Fatal("the ready older agent is not seen")
	}
	if old.ServingPredecessor() {
		t.Fatal("a newer agent counts as a predecessor")
	}
	if err := old.Stopping(); err != nil {
		t.Fatal(err)
	}
	if neu.ServingPredecessor() {
		t.Fatal("a stopping older agent still counts as serving")
	}
}
