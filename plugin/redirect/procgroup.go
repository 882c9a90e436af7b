package redirect

import (
	"errors"
	"os"
	"os/exec"
	"time"

	"golang.org/x/sys/unix"
)

// runWaitDelay is how long a run waits for its output pipes once its
// process group is killed (a cut run) or once it exited on its own.
// Killing the group closes the pipes at once, so a cut run waits this
// long only for a child that left the group. A run that exited on its
// own waits this long for the goroutine draining its output, which on
// a loaded node can be scheduled late: at 200 ms an ip6tables-nft-save
// under a parallel test load of ~9 on two vCPUs failed, "WaitDelay
// expired before I/O complete", its output cut (TestRunInOutputDrainedLate).
const runWaitDelay = 2 * time.Second

// EndWithGroup makes cmd (made with exec.CommandContext) end with its
// children when its context ends: iptables-legacy forks modprobe for a
// table module not loaded yet, and a child left holding the output pipe
// would keep Wait, and the caller's deadline, waiting for it. The run
// gets a process group of its own, killed whole; WaitDelay covers a
// child that left the group.
func EndWithGroup(cmd *exec.Cmd) {
	cmd.SysProcAttr = &unix.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error {
		err := unix.Kill(-cmd.Process.Pid, unix.SIGKILL)
		if errors.Is(err, unix.ESRCH) {
			return os.ErrProcessDone
		}
		return err
	}
	cmd.WaitDelay = runWaitDelay
}
