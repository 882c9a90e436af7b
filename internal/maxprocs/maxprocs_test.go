package maxprocs

import "testing"

func TestChoose(t *testing.T) {
	for _, c := range []struct {
		env        string
		configured int
		available  int
		want       int
		from       string
	}{
		{"", 0, 1, 1, "default: the one CPU available"},
		{"", 0, 2, 2, "default: half of 2 CPUs, at least two"},
		{"", 0, 3, 2, "default: half of 3 CPUs, at least two"},
		{"", 0, 4, 2, "default: half of 4 CPUs, at least two"},
		{"", 0, 5, 2, "default: half of 5 CPUs, at least two"},
		{"", 0, 16, 8, "default: half of 16 CPUs, at least two"},
		{"", 4, 16, 4, "config"},
		{"6", 4, 16, 6, "GOMAXPROCS"},
		// Go ignores a GOMAXPROCS it cannot parse; so do we.
		{"lots", 0, 8, 4, "default: half of 8 CPUs, at least two"},
		{"0", 3, 8, 3, "config"},
	} {
		n, from := Choose(c.env, c.configured, c.available)
		if n != c.want || from != c.from {
			t.Errorf("Choose(%q, %d, %d) = %d, %q; want %d, %q", c.env, c.configured, c.available, n, from, c.want, c.from)
		}
	}
}
