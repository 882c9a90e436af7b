// Command pause is the sandbox ("pause") image of the e2e cluster: a static
// binary that holds a pod's namespaces open, reaps orphans (it is PID 1 of
// the sandbox when the pod shares its PID namespace) and exits on
// SIGINT/SIGTERM. It exists because the cluster has no registry to pull
// registry.k8s.io/pause from.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sig := make(chan os.Signal, 8)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range sig {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var ws syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
