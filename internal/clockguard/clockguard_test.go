package clockguard

import (
	"fmt"
	"strings"
	"testing"
)

// recorder is a testing.TB that keeps what Check reports.
type recorder struct {
	testing.TB
	errs []string
}

func (r *recorder) Helper() {}
func (r *recorder) Errorf(format string, args ...any) {
	r.errs = append(r.errs, fmt.Sprintf(format, args...))
}
func (r *recorder) Fatal(args ...any) { r.TB.Fatal(args...) }

// TestCheck: each wall-clock call in the code is reported with where it
// is, a listed function's call is not, a stale entry is, test files are
// not read, and a clean package passes.
func TestCheck(t *testing.T) {
	r := &recorder{TB: t}
	Check(r, "testdata/wall", nil, "nanotime")
	if len(r.errs) != 2 ||
		!strings.Contains(r.errs[0], "wall.go:7") || !strings.Contains(r.errs[0], ".UnixNano in wall.go:conn.touch") ||
		!strings.Contains(r.errs[1], "wall.go:9") || !strings.Contains(r.errs[1], ".Unix in wall.go:since") ||
		!strings.Contains(r.errs[0], "use nanotime") {
		t.Errorf("wall, nothing allowed: %q, want conn.touch's UnixNano and since's Unix", r.errs)
	}

	r = &recorder{TB: t}
	Check(r, "testdata/wall", map[string]string{"wall.go:conn.touch": "a date", "wall.go:gone": "stale"}, "nanotime")
	if len(r.errs) != 2 || !strings.Contains(r.errs[0], "wall.go:since") || !strings.Contains(r.errs[1], `"wall.go:gone" matches no call`) {
		t.Errorf("wall, touch allowed and a stale entry: %q, want since's call and the stale entry", r.errs)
	}

	r = &recorder{TB: t}
	Check(r, "testdata/clean", nil, "nanotime")
	if len(r.errs) != 0 {
		t.Errorf("clean: %q, want nothing", r.errs)
	}
}
