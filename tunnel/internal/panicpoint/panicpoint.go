// Package panicpoint makes a test's code panic at one chosen place: the
// first call to Check, once armed, made from a goroutine whose stack
// names that place (a function's name as runtime.Stack prints it). The
// panic-recovery tests of tunnel and hbone use it to panic inside a real
// socket write or read made by one handler, while the same connection's
// other goroutines (a read loop, a relay's second copy), where nothing
// recovers and the test binary would end, go on untouched.
package panicpoint

import (
	"bytes"
	"runtime"
	"sync/atomic"
)

// Point is one place to panic at; the zero value is disarmed.
type Point struct {
	where atomic.Pointer[string]
}

// Arm makes the next Check from a goroutine whose stack contains where
// panic.
func (p *Point) Arm(where string) { p.where.Store(&where) }

// Armed reports whether the point has not fired since Arm.
func (p *Point) Armed() bool { return p.where.Load() != nil }

// Check panics with v when armed and called from the armed place, and
// disarms: it fires once per Arm.
func (p *Point) Check(v any) {
	w := p.where.Load()
	if w == nil {
		return
	}
	buf := make([]byte, 64<<10)
	buf = buf[:runtime.Stack(buf, false)]
	if bytes.Contains(buf, []byte(*w)) && p.where.CompareAndSwap(w, nil) {
		panic(v)
	}
}

// StreamHook, when set (tests only), is called by hbone where the panic
// tests make a stream's own code panic, with the *hbone.Stream: the
// drain goroutine's write to the app, the pump's read of the app once it
// took a big-read slot, reserve. Here rather than in hbone so that the
// tunnel's tests, which run the agent's handlers over real pods, can set
// it too. Atomic: a test sets it while an earlier test's goroutines may
// still run. Unset: a load and a branch.
var StreamHook atomic.Pointer[func(stream any)]
