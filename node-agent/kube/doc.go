// Package kube is the agent's Kubernetes source: it implements
// cluster.View (including the tunnel's Directory) and cluster.StatusWriter
// on top of client-go shared informers.
//
// What it watches, and why:
//
//   - pods on this node (field selector spec.nodeName=<node>): the pods the
//     agent enrolls; their changes become cluster.Events;
//   - all pods, trimmed by a transform to the fields the mesh uses (name,
//     namespace, uid, labels, ambit.dev/* annotations, service account,
//     node, pod IPs, phase, hostNetwork), so a 10,000-pod cluster costs a
//     few MB: the pod IP → workload directory the tunnel consults per
//     connection, and the opt-in namespaces of the enrollment snapshot;
//   - namespaces (labels drive enrollment), Services and EndpointSlices
//     (Service address:port → the endpoints kube-proxy on this node would
//     use, indexed by address:port for O(1) lookups; the addresses are the
//     clusterIPs, externalIPs and LoadBalancer ingress IPs, see
//     ServiceEntries).
//
// Meshed. A remote pod is reported Meshed only when its annotation
// ambit.dev/redirection is "enabled": that annotation is written by the
// agent of the pod's node after the redirection and listeners are in place,
// so it is the only signal that HBONE on <ip>:15008 will actually answer.
// The label-based decision (Config.Decide) says what *should* be enrolled;
// a pod that should be but is not yet (agent restarting, failed, pending)
// would otherwise be sent HBONE it cannot terminate. Decide is used for
// what the labels say: AmbientNamespaces, OptInNamespaces, WouldEnroll.
//
// Usage from the agent:
//
//	src, err := kube.New(kube.Config{
//		Client:      clientset,            // kubernetes.Interface
//		NodeName:    os.Getenv("NODE_NAME"),
//		TrustDomain: "cluster.local",
//		Decide:      enrollment.Decide,    // the agent's one rule
//	})
//	if err != nil { ... }
//	src.Subscribe(func(ev cluster.Event) { queue.Add(ev) }) // before Start
//	src.Start(ctx)                    // informers run until ctx is done
//	if err := src.WaitSynced(ctx); err != nil { ... }
//	defer src.Close()                 // stops the event broadcaster
//	var view cluster.View = src       // and tunnel.Directory
//	var status cluster.StatusWriter = src
//	status.SetRedirection(ctx, pod, "enabled")
//	status.Warn(ctx, pod, "RedirectionFailed", err.Error())
//
// RBAC the agent needs: pods get/list/watch/patch, namespaces, services and
// discovery.k8s.io endpointslices get/list/watch, events create/patch.
package kube
