module github.com/ambit-mesh/ambit/tunnel/interop/istio

go 1.26.8

require github.com/ambit-mesh/ambit v0.0.0

require istio.io/istio v0.0.0-20260827124520-eed52ebb66ad // indirect

replace github.com/ambit-mesh/ambit => ../../..
