// Package statussync keeps each pod's ambit.dev/redirection annotation at
// the state the node agent wants for it.
//
// Other nodes' agents send HBONE to a pod only once they see "enabled";
// until then they treat it as not meshed (plaintext, which a strict pod
// refuses). So a write that is lost — an API error or timeout, an agent
// that dies before writing, someone removing the annotation — must not
// stay lost. The Syncer is level-triggered: the agent states what it
// wants per pod (Set, last state wins), the pod informer's cache says
// what the pod carries, and the Syncer writes only where the two differ:
//
//   - at once when the wanted state changes (one work queue keyed by
//     pod, so repeated updates of one pod coalesce into one write of the
//     latest state and a pod is never written by two workers at once);
//   - when the informer reports the pod changed (Changed);
//   - on a periodic pass (Options.Interval) comparing every pod, which
//     catches what no event reports: a write acknowledged but not
//     applied, a removal the cache saw before the wanted state existed;
//   - after a failed write, again with per-pod exponential backoff
//     (Options.MinRetry…MaxRetry), so an API server outage costs at most
//     one attempt per pod per MaxRetry.
//
// A pod that is gone (404) is dropped, as is one the agent Forgets (its
// sandbox deleted). Nothing is written where the cache already agrees, so
// a periodic pass over a node whose annotations are right costs no API
// call; the one allowance is Options.Settle after a successful write,
// while the informer has not yet delivered that write back.
//
// The order of the writes against the rules is the agent's: it calls Set
// with "enabled" only once the pod's listeners and rules are in place,
// and with "" only after it removed them (docs/agent.md says why that
// order fails closed). The Syncer never writes a state that was not the
// latest one wanted when its write began; a write in flight when the
// wanted state changes is followed by one of the new state.
package statussync
