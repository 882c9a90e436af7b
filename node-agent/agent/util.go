package agent

import (
	"fmt"
	"os"

	"github.com/containernetworking/plugins/pkg/ns"
)

func sprintf(format string, args ...any) string { return fmt.Sprintf(format, args...) }

// setMigrateReq sets net.ipv4.tcp_migrate_req=1 inside the pod's netns:
// when a listener of a SO_REUSEPORT group closes, connections in its
// accept queue move to another listener of the group (the new agent's)
// instead of being reset. The sysctl is per network namespace.
func setMigrateReq(f *os.File) error {
	return withNS(f, func(n ns.NetNS) error {
		return n.Do(func(ns.NetNS) error {
			return os.WriteFile("/proc/sys/net/ipv4/tcp_migrate_req", []byte("1"), 0)
		})
	})
}
