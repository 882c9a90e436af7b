// Command ambit-demo shows Ambit working on one machine without a cluster:
// a simulated node (a network namespace with a bridge), pods created through
// the real CNI chain (bridge + host-local, then ambit-cni), the real agent
// with a static inventory and a local CA, and requests between the pods —
// printed in plain words, with a packet capture that proves what was on
// the wire. It cleans up after itself, also when interrupted.
//
//	ambit-demo            run the demo (root)
//	ambit-demo serve ...  the demo's server app (runs inside a pod)
//	ambit-demo get ...    the demo's client app (runs inside a pod)
package main

import (
	"fmt"
	"os"
)

func main() {
	var err error
	switch {
	case len(os.Args) > 1 && os.Args[1] == "serve":
		err = serve(os.Args[2:])
	case len(os.Args) > 1 && os.Args[1] == "get":
		err = get(os.Args[2:])
	case len(os.Args) == 1 || os.Args[1] == "run":
		err = runDemo()
	default:
		err = fmt.Errorf("usage: ambit-demo [run|serve|get]")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "ambit-demo:", err)
		os.Exit(1)
	}
}
