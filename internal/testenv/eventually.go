package testenv

import (
	"testing"
	"time"
)

// Eventually polls cond every 5 ms until it holds, failing t with what
// it waited for if it does not within 10 s: a bound far past what a
// passing test takes on a loaded machine, so it fails only on a real
// hang, and short polls keep a passing test fast.
func Eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
