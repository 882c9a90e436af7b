// Package kube is the agent's Kubernetes source: it implements
// cluster.View (including the tunnel's Directory) and cluster.StatusWriter
// on top of client-go shared informers.
//
// What it watches, and why:
//
//   - pods on this node (field selector spec.nodeName=<node>): the pods the
//     agent enrolls; their changes become cluster.Events;
//   - all pods, trimmed by a transform to the fields the mesh uses (name,
//     namespace, uid, labels, the ambit.dev/redirection annotation, service account,
//     node, pod IPs, phase, hostNetwork), so a 10,000-pod cluster costs a
//     few MB: the pod IP → workload directory the tunnel consults per
//     connection, and the opt-in namespaces of the enrollment snapshot;
//   - namespaces (labels drive enrollment), Services and EndpointSlices
//     (Service address:port → the endpoints kube-proxy on this node would
//     use, indexed by address:port for O(1) lookups; the addresses are the
//     clusterIPs, externalIPs and LoadBalancer ingress IPs, see
//     ServiceEntries);
//   - this node's Node object alone (field selector metadata.name), for
//     its topology.kubernetes.io/zone label: topology hints
//     (trafficDistribution PreferClose/PreferSameZone/PreferSameNode) are
//     applied against it, and a change of zone rebuilds every Service;
//   - every Node, trimmed to name, zone label and InternalIP/ExternalIP
//     addresses (a Node's status, images above all, is the bulk of it):
//     the addresses kube-proxy serves NodePorts on. A pod's connection to
//     <any node's address>:<nodePort> resolves like the Service's
//     externalIPs: the cluster-wide endpoints of the address's family
//     (kube-proxy short-circuits pod traffic to a NodePort to its cluster
//     policy chain, whatever externalTrafficPolicy and
//     internalTrafficPolicy say), with the port's affinity. The index
//     keeps a node-address set and a nodePort map (not nodes × nodePorts
//     in the address map), read only when the address map misses and
//     the port is a nodePort (a bitmap), so a clusterIP hit and a pod IP
//     miss cost what they did.
//
// Endpoint choice. The index holds, per Service address, what kube-proxy
// on this node would pick from: ready endpoints (else serving terminating
// ones), narrowed to this node's with internalTrafficPolicy Local, else to
// those hinted for this node or its zone when every ready endpoint carries
// such hints; and of each list, endpoints naming a pod (targetRef) the pod
// cache does not have yet with that address are left out while another
// remains (the tunnel would take them for pods outside the mesh: plaintext,
// refused by a strict destination; ztunnel skips them too), the Service
// rebuilt when the pod arrives. The tunnel then picks one per connection (tunnel/balance):
// at random, or under sessionAffinity ClientIP the one this client pod IP
// used last for the Service port (ServiceByAddr carries the timeout and
// the port's identity).
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
// RBAC the agent needs: pods get/list/watch/patch, namespaces, nodes,
// services and discovery.k8s.io endpointslices get/list/watch, events
// create/patch. Without any of them but nodes the Source never syncs.
// Without nodes (a ClusterRole from before topology: an image-only
// upgrade) it syncs with the zone unknown and logs a warning once:
// topology is an optimisation, and an agent that never became ready over
// it would stall the rollout. Allowed its own Node but not the list of all
// (resourceNames), or with none, it syncs without NodePorts (passed
// through, as before they were resolved) and warns once more; either
// informer keeps retrying, so RBAC fixed later takes effect without a
// restart. The two Node informers are separate so that topology does not
// depend on the larger one: the own-Node watch costs one object.
package kube
