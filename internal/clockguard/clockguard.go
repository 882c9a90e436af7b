package clockguard

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

// Check parses the non-test Go files in dir and fails t on each
// wall-clock call (wallClockCalls) in a function allowed does not list
// ("file.go:Func", a method as "Type.Method", each entry with its
// reason), and on each entry of allowed no call matches (stale). use
// names what the package offers instead, for the message.
func Check(t testing.TB, dir string, allowed map[string]string, use string) {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "*.go"))
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	used := map[string]bool{}
	var bad []string
	for _, path := range files {
		name := filepath.Base(path)
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, path, nil, parser.SkipObjectResolution)
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
		t.Errorf("%s: a wall-clock number (it drops the monotonic reading; use %s, or list it with its reason)", b, use)
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
