package lab

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// App is a tiny TCP server running inside a pod's network namespace (the
// listening socket lives there; the goroutines are ours). For every line a
// client sends it answers "<name> <peer-ip> <line>": enough to prove who
// answered, which source address the app saw and that bytes arrived intact.
type App struct {
	Name string
	Port uint16
	l    net.Listener
	wg   sync.WaitGroup
	mu   sync.Mutex
	conn map[net.Conn]struct{}
}

// ServeApp starts an App on port inside pod.
func (p *Pod) ServeApp(name string, port uint16) (*App, error) {
	a := &App{Name: name, Port: port, conn: map[net.Conn]struct{}{}}
	err := p.NetNS.Do(func(ns.NetNS) error {
		l, err := net.Listen("tcp", fmt.Sprintf(":%d", port))
		a.l = l
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("app %s in pod %s: %w", name, p.Name, err)
	}
	a.wg.Add(1)
	go a.accept()
	return a, nil
}

func (a *App) accept() {
	defer a.wg.Done()
	for {
		c, err := a.l.Accept()
		if err != nil {
			return
		}
		a.mu.Lock()
		a.conn[c] = struct{}{}
		a.mu.Unlock()
		a.wg.Add(1)
		go func() {
			defer a.wg.Done()
			defer func() { a.mu.Lock(); delete(a.conn, c); a.mu.Unlock(); c.Close() }()
			peer := c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
			r := bufio.NewReader(c)
			for {
				line, err := r.ReadString('\n')
				if err != nil {
					return
				}
				if _, err := fmt.Fprintf(c, "%s %s %s", a.Name, peer, line); err != nil {
					return
				}
			}
		}()
	}
}

// Close stops the app and its connections.
func (a *App) Close() {
	a.l.Close()
	a.mu.Lock()
	for c := range a.conn {
		c.Close()
	}
	a.mu.Unlock()
	a.wg.Wait()
}

// Reply is what the App answered.
type Reply struct {
	App  string
	Peer netip.Addr
	Echo string
}

// Dial connects from inside pod to dst (the socket lives in the pod's
// namespace, so the pod's own redirection applies).
func (p *Pod) Dial(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
	var c net.Conn
	err := p.NetNS.Do(func(ns.NetNS) error {
		var d net.Dialer
		var err error
		c, err = d.DialContext(ctx, "tcp", dst.String())
		return err
	})
	return c, err
}

// Ask connects from pod to dst, sends one line and returns the reply.
func (p *Pod) Ask(ctx context.Context, dst netip.AddrPort, line string) (Reply, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c, err := p.Dial(ctx, dst)
	if err != nil {
		return Reply{}, err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	return AskOn(c, line)
}

// AskOn sends one line on an open connection and parses the reply.
func AskOn(c net.Conn, line string) (Reply, error) {
	if _, err := io.WriteString(c, line+"\n"); err != nil {
		return Reply{}, err
	}
	r := bufio.NewReader(c)
	s, err := r.ReadString('\n')
	if err != nil {
		return Reply{}, err
	}
	f := strings.SplitN(strings.TrimSuffix(s, "\n"), " ", 3)
	if len(f) != 3 {
		return Reply{}, fmt.Errorf("unexpected reply %q", s)
	}
	peer, err := netip.ParseAddr(f[1])
	if err != nil {
		return Reply{}, fmt.Errorf("unexpected reply %q: %v", s, err)
	}
	return Reply{App: f[0], Peer: peer, Echo: f[2]}, nil
}
