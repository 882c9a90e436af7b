// Package podsysctl writes network-namespace sysctls of pods from inside
// the agent's container.
//
// The per-netns sysctls under /proc/sys/net resolve against the network
// namespace of the thread that opens the file, so setns(2) into the pod
// and a write would do, except that container runtimes mount /proc/sys
// read-only in every unprivileged container (the agent is one: a handful
// of capabilities, not privileged). A write there fails with EROFS, and
// until this package it failed silently: net.ipv4.tcp_migrate_req stayed
// 0 in every pod of a real cluster, so connections queued on an old
// agent's listeners were reset at a hand-over or a keeper release
// instead of moving to the new agent's (e2e/kube's kill -9 caught it).
//
// A Writer therefore keeps one OS thread of its own in a private mount
// namespace (unshare(CLONE_NEWNS), everything made private so nothing
// propagates back) with a fresh procfs mounted over /proc: that mount is
// writable whatever the container's /proc looks like. It needs
// CAP_SYS_ADMIN (the agent has it for setns) and no AppArmor "deny
// mount" (the DaemonSet runs the agent unconfined). Where the mount is
// refused the Writer falls back to the process's own /proc, which works
// on a host and in a privileged container. No other thread is touched:
// the thread stays locked and dies with its goroutine.
package podsysctl
