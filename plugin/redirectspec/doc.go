// Package redirectspec holds the parameters of the in-pod redirection (the
// Spec the agent decides) and the names of the rule backends, with their
// validation, and nothing that builds rules.
//
// It exists so the plugin↔agent protocol (plugin/cniproto), and with it
// ambit-cni, can name these values without linking plugin/redirect's
// nftables, netlink and iptables code: ambit-cni is exec'd once per pod,
// and every package it links costs start-up time (package inits, page
// faults) whether the pod is enrolled or not. plugin/redirect re-exports
// everything here under its old names.
package redirectspec
