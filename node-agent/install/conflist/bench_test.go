package conflist

import (
	"encoding/json"
	"os"
	"testing"
)

// BenchmarkEnsure chains our entry into Calico's conflist by splicing.
// BenchmarkRoundTripBaseline is what a decode/append/re-encode installer
// does (and loses key order and formatting doing it); compare the two
// ns/op in the same run.
func BenchmarkEnsure(b *testing.B) {
	in, err := os.ReadFile("testdata/10-calico.conflist")
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, _, err := Ensure(in, ours); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkRoundTripBaseline(b *testing.B) {
	in, err := os.ReadFile("testdata/10-calico.conflist")
	if err != nil {
		b.Fatal(err)
	}
	var entry map[string]any
	json.Unmarshal(ours.JSON, &entry)
	b.ReportAllocs()
	for b.Loop() {
		var m map[string]any
		if err := json.Unmarshal(in, &m); err != nil {
			b.Fatal(err)
		}
		m["plugins"] = append(m["plugins"].([]any), entry)
		if _, err := json.MarshalIndent(m, "", "  "); err != nil {
			b.Fatal(err)
		}
	}
}
