package main

import (
	"os"
	"testing"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// TestMain removes the binaries testenv.Binary built for these tests.
func TestMain(m *testing.M) { os.Exit(testenv.Main(m)) }
