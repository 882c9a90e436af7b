// Package inventory is the agent's cluster view for machines without
// Kubernetes (podman or nerdctl hosts, the demo, tests): a static file that
// lists namespaces with labels, workloads with labels and service accounts,
// and services. It implements cluster.View and cluster.StatusWriter (the
// latter only logs).
//
// The file is YAML or JSON (JSON is YAML); its format is documented in
// node-agent/README.md. Every error names the line and the field. The file
// is watched: a change is reloaded and turned into change events; a broken
// edit is reported and the last good content stays in force, so a typo
// never unenrolls the node.
//
// Pod IPs need not be written down: in static mode they come from the CNI
// ADD (prevResult), which the agent passes on with Learn, so the tunnel's
// directory knows them before anything else could.
package inventory
