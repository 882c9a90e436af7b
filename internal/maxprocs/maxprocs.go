package maxprocs

import (
	"context"
	"os"
	"runtime"
	"strconv"
)

// Default is the agent's P count for a process with available CPUs:
// half of them, but two where there are two or three (doc.go says why).
func Default(available int) int {
	return min(max(1, available), max(2, available/2))
}

// Choose returns the P count and where it comes from ("GOMAXPROCS",
// "config" or "default: half of N CPUs"): env is the GOMAXPROCS
// variable as set ("" when unset), configured the agent's maxProcs (0:
// unset), available what Go's runtime chose by itself.
func Choose(env string, configured, available int) (int, string) {
	if n, err := strconv.Atoi(env); err == nil && n > 0 {
		return n, "GOMAXPROCS"
	}
	if configured > 0 {
		return configured, "config"
	}
	if available < 2 {
		return Default(available), "default: the one CPU available"
	}
	return Default(available), "default: half of " + strconv.Itoa(available) + " CPUs, at least two"
}

// Apply sets GOMAXPROCS as Choose says and returns the same.
func Apply(configured int) (int, string) {
	n, from := Choose(os.Getenv("GOMAXPROCS"), configured, runtime.GOMAXPROCS(0))
	runtime.GOMAXPROCS(n)
	return n, from
}

// Start applies the P count as Apply does. When that is the default and
// more than one, it then adapts the count between one and that ceiling
// with the process's load until ctx ends (Adaptive, which says why);
// a configured or GOMAXPROCS count stays fixed. It returns the count (the
// ceiling when adapting), where it comes from, and whether it adapts.
func Start(ctx context.Context, configured int, onChange func(from, to int, busy float64)) (int, string, bool) {
	n, from := Apply(configured)
	if !adapts(os.Getenv("GOMAXPROCS"), configured, n) {
		return n, from, false
	}
	a := &Adaptive{Floor: 1, Ceiling: n, OnChange: onChange}
	go a.Run(ctx)
	return n, from, true
}

// adapts: only the default count adapts, and only above one.
func adapts(env string, configured, n int) bool {
	if v, err := strconv.Atoi(env); err == nil && v > 0 {
		return false
	}
	return configured <= 0 && n > 1
}
