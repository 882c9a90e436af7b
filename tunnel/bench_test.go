package tunnel_test

import (
	"fmt"
	"os"
	"testing"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/tunnel/internal/benchkit"
	"github.com/ambit-mesh/ambit/tunnel/internal/meshtest"
)

// BenchmarkDataPath compares, in one run on the same two-netns topology:
// direct (no mesh), a plain TCP relay pair, and Ambit. (The Istio Go
// HBONE baseline runs in tunnel/interop/istio, which adds it to the same
// table.) Figures are medians of interleaved rounds; ratios are against
// the relay pair. Never pass/fail on timing.
func BenchmarkDataPath(b *testing.B) {
	testenv.RequireRoot(b)
	setups := []benchkit.Setup{benchkit.Direct(b), benchkit.RelayPair(b)}
	amb, _ := benchkit.Ambit(b, meshtest.Options{})
	setups = append(setups, amb)
	b.ResetTimer()
	var rs []benchkit.Result
	for i := 0; i < b.N; i++ {
		rs = benchkit.Run(b, setups, benchkit.Options{})
	}
	b.StopTimer()
	fmt.Fprintf(os.Stdout, "\n%s\n", benchkit.Table(rs, "relay pair"))
	benchkit.Report(b, rs)
}
