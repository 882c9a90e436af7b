package redirect

import (
	"errors"
	"os"
	"os/exec"
	"time"

	"golang.org/x/sys/unix"
)

// runWaitDelay is how long a cut run waits for its output pipes after
// its process group is killed.
const runWaitDelay = 200 * time.Millisecond

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
