package tunnel

import (
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"sort"
	"strings"
	"testing"
)

// wallClockAllowed lists the reads of a time as wall-clock numbers
// (wallClockCalls) the package's code may keep, by "file.go:Func" (a
// method as "Type.Method"), each with its reason: for instance a time
// that leaves the process (a log's or a peer's timestamp), never one
// compared with a duration. None today: every elapsed time here is on
// the monotonic clock (clock.go).
var wallClockAllowed = map[string]string{}

// TestNoWallClockStamps: no code of the package turns a time into a
// wall-clock number (t.UnixNano() and its kin) or back (time.Unix), but
// what wallClockAllowed lists. Such a number lost the monotonic reading:
// a timestamp kept as one and compared with a duration moved with every
// step of the wall clock (NTP after a VM's migration or a suspend,
// chrony's makestep, date -s), closing live connections as stalled or
// dead at a forward step and stretching every timeout at a backward one
// (here: a pending handshake's owedSince, evicted as stale at a forward
// step). Stamps go through monoNanos and monoTime instead.
func TestNoWallClockStamps(t *testing.T) {
	checkNoWallClockStamps(t, wallClockAllowed)
}

// checkNoWallClockStamps parses the package's non-test Go files and
// fails on each wall-clock call (wallClockCalls) in a function allowed
// does not list, and on each entry of allowed no call matches (stale).
func checkNoWallClockStamps(t *testing.T, allowed map[string]string) {
	t.Helper()
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	used := map[string]bool{}
	var bad []string
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, parser.SkipObjectResolution)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range f.Decls {
			fn := name + ":" + declName(d)
			ast.Inspect(d, func(n ast.Node) bool {
				sel, ok := n.(*ast.SelectorExpr)
				if !ok || !wallClockCalls[sel.Sel.Name] {
					return true
				}
				if _, ok := allowed[fn]; ok {
					used[fn] = true
					return true
				}
				bad = append(bad, fmt.Sprintf("%s: .%s in %s", fset.Position(sel.Sel.Pos()), sel.Sel.Name, fn))
				return true
			})
		}
	}
	sort.Strings(bad)
	for _, b := range bad {
		t.Errorf("%s: a wall-clock number (it drops the monotonic reading; use monoNanos/monoTime, or list it with its reason)", b)
	}
	for fn := range allowed {
		if !used[fn] {
			t.Errorf("wall-clock allow-list entry %q matches no call: remove it", fn)
		}
	}
}

// wallClockCalls are the selectors that turn a time into a wall-clock
// number, or such a number into a time without a monotonic reading:
// t.Unix(), t.UnixMilli(), t.UnixMicro(), t.UnixNano(), and time.Unix,
// time.UnixMilli, time.UnixMicro.
var wallClockCalls = map[string]bool{"Unix": true, "UnixMilli": true, "UnixMicro": true, "UnixNano": true}

// declName names a top-level declaration: Func, Type.Method, or "var"
// and the like for the rest.
func declName(d ast.Decl) string {
	fd, ok := d.(*ast.FuncDecl)
	if !ok {
		return d.(*ast.GenDecl).Tok.String()
	}
	if fd.Recv == nil || len(fd.Recv.List) == 0 {
		return fd.Name.Name
	}
	typ := fd.Recv.List[0].Type
	if st, ok := typ.(*ast.StarExpr); ok {
		typ = st.X
	}
	switch tt := typ.(type) {
	case *ast.IndexExpr:
		typ = tt.X
	case *ast.IndexListExpr:
		typ = tt.X
	}
	if id, ok := typ.(*ast.Ident); ok {
		return id.Name + "." + fd.Name.Name
	}
	return fd.Name.Name
}
