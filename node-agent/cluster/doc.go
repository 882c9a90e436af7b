// Package cluster defines the agent's view of the cluster — pods on this
// node, namespaces, and the mesh directory the tunnel consults — behind one
// interface with two sources: Kubernetes informers (package kube) and a
// static inventory file (package inventory) for machines without
// Kubernetes.
package cluster
