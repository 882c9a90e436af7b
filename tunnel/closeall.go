package tunnel

import (
	"context"
	"sync"

	"github.com/ambit-mesh/ambit/tunnel/hbone"
)

// closeConns closes cs cleanly, all at once, and waits for them; past
// ctx it cuts the closes still running (abortConn) and waits for those
// too. It says whether all ended within ctx.
//
// A clean close may wait on its peer: a writer blocked on a full socket
// is woken only as the link drains, which hbone's close waits for while
// the link moves (up to 10 × PingTimeout), and a dead peer holds it a
// second. One after another, n such connections held the caller n
// times as long, and outside its deadline: an agent's drain went on
// past DrainTimeout, into the kubelet's SIGKILL. Cutting a close closes
// the socket under TLS, which fails the blocked write at once.
func closeConns(ctx context.Context, cs []*hbone.Conn) bool {
	if len(cs) == 0 {
		return true
	}
	var wg sync.WaitGroup
	for _, c := range cs {
		wg.Add(1)
		go func() { defer wg.Done(); c.Close() }()
	}
	all := make(chan struct{})
	go func() { wg.Wait(); close(all) }()
	select {
	case <-all:
		return true
	case <-ctx.Done():
	}
	for _, c := range cs {
		select {
		case <-c.Done():
		default:
			abortConn(c)
		}
	}
	<-all
	return false
}
