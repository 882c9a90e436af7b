package agent

import "github.com/ambit-mesh/ambit/node-agent/instance"

// ServingBeside is Options.Beside read from the node's instance registry:
// a newer agent that is ready (it has re-adopted every pod, so its
// listeners are beside this one's in each), or an older one that still
// serves (ready, not stopping: a rollback deleting this, the surge
// agent). Agents that are starting, stopping or dead do not count: their
// listeners are not, or soon not, there to take the queue over.
func ServingBeside(self *instance.Self) func() bool {
	return func() bool {
		if _, ok := self.ReadySuccessor(); ok {
			return true
		}
		return self.ServingPredecessor()
	}
}
