package agent

import "slices"

// CNI networks of a sandbox (state.Pod.Networks).
//
// A runtime GCs each network configuration on its own (CNI 1.1: the
// valid attachments are those "of this network configuration"; CRI-O's
// ocicni runs GC for every conflist, Multus 4.2+ delegates it per
// network). With ambit-cni in the cluster network's chain and in a
// NetworkAttachmentDefinition's, the GC of the latter lists only its own
// attachments. Taken for the node's whole list, it made the agent forget
// every pod of the cluster network (listeners closed, connections
// refused). So the agent keeps, per sandbox, the networks it has an
// attachment in, and a network's GC forgets a sandbox only once no
// network it is known in still lists it.
//
// Records written before the plugin sent the network's name (or by such
// a plugin during an upgrade) do not know the network of their own
// attachment: it is "" here, and a named GC never forgets on behalf of
// "". It would have been simpler to take such a record for the cluster
// network's (where the installer puts ambit-cni), but its ADD may have
// come through another chain, and the agent does not know the cluster
// network's name anyway. Instead it learns: a CHECK or ADD of the
// record's own interface, or a GC that lists the record's own
// attachment (container ID and interface name: one attachment, in one
// network), names the network, and from then on that network's GC
// collects it. A leaked sandbox never listed again (gone before any
// named GC ran) is still collected as before by other means: its DEL, the
// reconcile when its pod leaves the API, or an older plugin's GC.

// addNetwork returns nets once the sandbox is known to have an
// attachment in network n; own tells that attachment is the record's
// own (its IfName), whose network nets may not know yet ("").
func addNetwork(nets []string, n string, own bool) []string {
	if n == "" {
		return nets
	}
	cur := slices.Clone(nets)
	if len(cur) == 0 {
		cur = []string{""}
	}
	if own {
		cur = slices.DeleteFunc(cur, func(s string) bool { return s == "" })
	}
	if !slices.Contains(cur, n) {
		cur = append(cur, n)
	}
	return normNetworks(cur)
}

// gcNetworks applies network n's GC to a sandbox in nets: listed tells
// whether n lists any attachment of it, own whether it lists the
// record's own. It returns the networks after the GC, and gone when the
// sandbox is in none any more (to be forgotten).
func gcNetworks(nets []string, n string, listed, own bool) (after []string, gone bool) {
	if listed {
		return addNetwork(nets, n, own), false
	}
	cur := slices.Clone(nets)
	if len(cur) == 0 {
		cur = []string{""}
	}
	cur = slices.DeleteFunc(cur, func(s string) bool { return s == n })
	if len(cur) == 0 {
		return nil, true
	}
	return normNetworks(cur), false
}

// normNetworks writes "only the own attachment's unknown network" as a
// record of an older agent does: none.
func normNetworks(nets []string) []string {
	if len(nets) == 1 && nets[0] == "" {
		return nil
	}
	return nets
}
