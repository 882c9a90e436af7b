// Package netnsfind finds a pod's network namespace when the agent's own
// record cannot be used (the runtime's netns path is gone or reused, or the
// pod was labelled after its ADD was answered by an older agent). It is
// the fallback, never the first choice, and it is careful in the ways
// others were not:
//
//   - the host's network namespace (that of PID 1) and the agent's own are
//     never candidates, whatever addresses they hold;
//   - a namespace is a candidate only when it holds one of the pod's IPs
//     (loopback and link-local addresses never count);
//   - namespaces are deduplicated by inode, so a pod with twenty processes
//     is one candidate;
//   - when several distinct namespaces hold the IP (a foreign container on
//     another bridge reusing the address), the one whose processes' cgroup
//     names the pod UID wins; if none or several do, the answer is an
//     error, never a guess;
//   - a lone namespace holding the IP whose processes run in kubelet pod
//     cgroups naming other pod UIDs, and not the one asked for, is that
//     other pod's (ErrOtherPod): the IP asked for is stale. Processes in
//     no pod cgroup (a bind mount alone, podman, the demo) tell nothing,
//     and the namespace is taken on its IP as before.
package netnsfind
