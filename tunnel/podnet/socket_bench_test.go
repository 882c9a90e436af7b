package podnet

import (
	"os"
	"os/exec"
	"testing"

	"golang.org/x/sys/unix"
)

// BenchmarkSocketInNetns: the cost of creating one socket inside a pod
// netns (thread lock, setns there and back, socket), against a plain
// socket() in our own namespace.
func BenchmarkSocketInNetns(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("SKIPPED: needs root")
	}
	name := "amb-tun-bench"
	exec.Command("ip", "netns", "add", name).Run()
	b.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	f, err := os.Open("/var/run/netns/" + name)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	n, err := Open(f)
	if err != nil {
		b.Fatal(err)
	}
	defer n.Close()
	b.Run("pod", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			fd, err := n.socket(unix.AF_INET, unix.SOCK_STREAM, 0)
			if err != nil {
				b.Fatal(err)
			}
			unix.Close(fd)
		}
	})
	b.Run("own", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				b.Fatal(err)
			}
			unix.Close(fd)
		}
	})
}
