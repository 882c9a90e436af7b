// Package filesource feeds the policy Engine from a directory of YAML (or
// JSON) files, for machines without Kubernetes: the same AuthorizationPolicy
// and InboundMode objects (and Istio AuthorizationPolicy) as in the cluster,
// kept next to the static inventory.
//
// Every *.yaml, *.yml and *.json file of the directory (not its
// subdirectories; hidden files are skipped, so a ConfigMap mount works) is
// read on start and again whenever the directory changes. A file that can
// no longer be read as YAML keeps its last good content in force, so a
// half-saved edit never opens access; one never read or never parsed
// since the start denies every connection until it is. Objects that read
// but are invalid, and documents of our groups whose apiVersion or kind
// is a typo, are enforced fail-closed by the Engine. Every problem is
// logged naming the file, the object and the field.
package filesource
