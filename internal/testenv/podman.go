package testenv

import (
	"os"
	"os/exec"
	"strings"
)

// PodmanGlobalArgs are the global flags every podman call of the tests
// starts with: a runtime that can run containers on this machine.
//
// Debian's podman defaults to crun, and crun refuses a hybrid cgroup
// layout (v1 controllers plus a cgroup2 "unified" mount) whose cgroup2
// side has any controller ("cgroups in hybrid mode not supported, drop
// all controllers from cgroupv2"). Some machines of this kind have
// hugetlb there. runc, which Debian's podman also installs, runs on that
// layout; where crun works nothing changes.
func PodmanGlobalArgs() []string {
	b, err := os.ReadFile("/sys/fs/cgroup/unified/cgroup.controllers")
	if err != nil || strings.TrimSpace(string(b)) == "" {
		return nil
	}
	runc, err := exec.LookPath("runc")
	if err != nil {
		return nil // crun will say what is wrong
	}
	return []string{"--runtime", runc}
}
