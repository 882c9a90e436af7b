// Package maxprocs sizes the agent's GOMAXPROCS.
//
// Go's default runs Go code on as many threads as the process has CPUs
// (its cgroup limit, since Go 1.25). The node agent shares its node with
// the apps whose bytes it carries: every byte it forwards was produced
// or is consumed by an app on the same node, and its work per connection
// is a chain of short hand-offs between goroutines (accept, pump, read
// loop, the app's socket). With as many Ps as CPUs each hand-off can wake
// another thread on another CPU, which costs a futex wake-up and a
// context switch and then competes with the apps for that CPU. Measured
// on a 2-vCPU machine with the apps and two agents busy
// (`BenchmarkDataPathAB`, docs/tunnel.md, session 5), one P instead of
// two gave the agents +6–12 % new connections per second in five of six
// runs and +5–11 % throughput with 7–11 % less CPU per byte in three of
// four (the other run: no difference), RTT unchanged; the relay pair
// (plain splice(2) relays, few hand-offs) gained little from the same
// setting.
//
// So the default is half the CPUs available — the same spirit as
// ztunnel's fixed two worker threads, but growing with the node — and
// at least two where there are two or three. Session 21 measured why on
// a faster host (docs/tunnel.md, "Session 21: two threads for a node's
// agent"): with one P, an agent serving both ends of a connection (two
// pods on one node) runs its sending pump and its receiving read loop
// on the same thread, and their system calls (the data path's are raw,
// so they keep the P) take turns; two Ps let the stages overlap. One
// agent for both pods, 2 Ps against 1: single-stream throughput 0.54 →
// 0.67× the relay pair, RTT p50 1.42 → 1.19× (paired), new connections
// per second equal, CPU per round trip 79 → 72 µs. A second P also
// keeps the data path moving while a system call blocks the other (an
// iptables child's wait).
//
// The second P has a price at moderate loads: Go's scheduler wakes an
// idle P's thread to look for work and parks it again, 6–29 % more agent
// CPU at 1,000 and 3,000 requests/s and 500 new connections/s. So the
// default count is a ceiling: the agent runs on one P while its load is
// light and takes more as soon as its Ps are busy (Adaptive, adapt.go).
// Measured, one agent for both pods: CPU at those fixed loads that of
// one P (0.067 / 0.140 / 0.187 vCPU against one P's 0.067 / 0.150 /
// 0.193 and two Ps' 0.070 / 0.163 / 0.237), and at saturation 0.58–0.61×
// the relay pair's throughput (two fixed Ps 0.60–0.63: the first tenth
// of a second of a burst runs on one), RTT p50 0.84–0.91×, 1.01× its new
// connections per second. Session 22 samples five times faster while
// the load is real (at least 30 % of the Ps) and a P is left to take, and
// steps up on two fast samples both busy, not on one (a GC cycle can
// fill one): a burst from idle gets its second P 60–130 ms after it
// starts instead of 60–160, one that finds such a load 20–50 ms after;
// an idle or lightly loaded agent still samples ten times a second. A
// configured value (the agent's maxProcs) overrides the default and
// stays fixed, and a GOMAXPROCS environment variable overrides both, as
// it does for any Go program.
package maxprocs
