// Package istio tests Ambit's HBONE against Istio's Go implementation
// (istio.io/istio/pkg/hbone) in both directions, and benchmarks an Istio
// Go HBONE proxy pair as a baseline. It is its own module so Istio's
// dependency tree stays out of Ambit's go.mod.
package istio
