package main

import (
	"os"
	"testing"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// TestMain removes the binaries testenv.Binary built for these tests. Run
// with peakRSSHelperEnv set, the test binary is instead the small parent
// that peakRSS needs (see there).
func TestMain(m *testing.M) {
	if os.Getenv(peakRSSHelperEnv) != "" {
		os.Exit(peakRSSHelper())
	}
	os.Exit(testenv.Main(m))
}
