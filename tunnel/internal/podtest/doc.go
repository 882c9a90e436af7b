// Package podtest builds real network-namespace "pods" for the tunnel's
// privileged tests and benchmarks: two namespaces on a veth pair, each
// with the in-pod redirection (nftables + policy routing) the node agent's
// CNI plugin installs, and helpers to run app code inside a pod.
//
// Namespaces are named amb-tun-<random> and removed by t.Cleanup.
package podtest
