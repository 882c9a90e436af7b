// Command kecho is the test application of the real-Kubernetes e2e suite:
// a static binary with no shell around it, so every probe a test makes is a
// deliberate `kubectl exec <pod> -- /kecho ...`.
//
//	kecho serve [-tcp :9000] [-http :8080]   TCP line echo and HTTP, both reporting the peer IP they see
//	kecho client [-timeout 5s] ADDR [MSG]    one TCP exchange: prints the server's line
//	kecho http [-timeout 5s] URL             one HTTP GET: prints the body
//	kecho load [-for 10s] [-every 20ms] [-conns 1] ADDR
//	                                         repeated TCP exchanges; prints JSON counts
//	                                         (ok, refused, reset, timeout, other)
//	kecho cat FILE                           print a file (e.g. a projected token)
//
// The server's reply is "peer=<ip> pod=<POD_NAME> node=<NODE_NAME> got=<MSG>"
// so a test sees which source address reached the app (Ambit must keep the
// client pod's IP) and that the payload arrived intact.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2:])
	case "client":
		err = client(os.Args[2:])
	case "http":
		err = httpGet(os.Args[2:])
	case "load":
		err = load(os.Args[2:])
	case "cat":
		err = cat(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "kecho:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: kecho serve|client|http|load ... (see source)")
	os.Exit(2)
}

func who(remote string) string {
	host, _, err := net.SplitHostPort(remote)
	if err != nil {
		host = remote
	}
	return fmt.Sprintf("peer=%s pod=%s node=%s", host, os.Getenv("POD_NAME"), os.Getenv("NODE_NAME"))
}

func serve(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	tcpAddr := fs.String("tcp", ":9000", "TCP echo address (empty: off)")
	httpAddr := fs.String("http", ":8080", "HTTP address (empty: off)")
	_ = fs.Parse(args)
	errc := make(chan error, 2)
	if *tcpAddr != "" {
		ln, err := net.Listen("tcp", *tcpAddr)
		if err != nil {
			return err
		}
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					errc <- err
					return
				}
				go handleTCP(c)
			}
		}()
	}
	if *httpAddr != "" {
		mux := http.NewServeMux()
		mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintln(w, who(r.RemoteAddr))
		})
		go func() { errc <- http.ListenAndServe(*httpAddr, mux) }()
	}
	fmt.Println("kecho: serving", *tcpAddr, *httpAddr)
	return <-errc
}

// handleTCP answers each line with who-sees-whom and the line itself.
func handleTCP(c net.Conn) {
	defer c.Close()
	r := bufio.NewReader(c)
	for {
		_ = c.SetReadDeadline(time.Now().Add(time.Minute))
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		if _, err := fmt.Fprintf(c, "%s got=%s\n", who(c.RemoteAddr().String()), strings.TrimSpace(line)); err != nil {
			return
		}
	}
}

func exchange(addr, msg string, timeout time.Duration) (string, error) {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	if _, err := fmt.Fprintf(c, "%s\n", msg); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(line), nil
}

func client(args []string) error {
	fs := flag.NewFlagSet("client", flag.ExitOnError)
	timeout := fs.Duration("timeout", 5*time.Second, "dial and exchange timeout")
	_ = fs.Parse(args)
	if fs.NArg() < 1 {
		return errors.New("client: need ADDR")
	}
	msg := "hello"
	if fs.NArg() > 1 {
		msg = strings.Join(fs.Args()[1:], " ")
	}
	line, err := exchange(fs.Arg(0), msg, *timeout)
	if err != nil {
		return err
	}
	fmt.Println(line)
	return nil
}

func httpGet(args []string) error {
	fs := flag.NewFlagSet("http", flag.ExitOnError)
	timeout := fs.Duration("timeout", 5*time.Second, "request timeout")
	_ = fs.Parse(args)
	if fs.NArg() != 1 {
		return errors.New("http: need URL")
	}
	resp, err := (&http.Client{Timeout: *timeout}).Get(fs.Arg(0))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("http: %s: %s", resp.Status, b)
	}
	fmt.Print(string(b))
	return nil
}

// Counts is what `kecho load` prints: one JSON object.
type Counts struct {
	OK      int      `json:"ok"`
	Refused int      `json:"refused"`
	Reset   int      `json:"reset"`
	Timeout int      `json:"timeout"`
	Other   int      `json:"other"`
	Peers   []string `json:"peers"` // distinct peer= values the server reported
	Errors  []string `json:"errors,omitempty"`
	// The outage: from the start of the first failed exchange to the end
	// of the last one, in ms since the load began (0 when none failed).
	FirstFailMs int64 `json:"first_fail_ms,omitempty"`
	LastFailMs  int64 `json:"last_fail_ms,omitempty"`
}

func load(args []string) error {
	fs := flag.NewFlagSet("load", flag.ExitOnError)
	dur := fs.Duration("for", 10*time.Second, "how long to run (bounded)")
	every := fs.Duration("every", 20*time.Millisecond, "pause between exchanges per connection loop")
	conns := fs.Int("conns", 1, "concurrent loops")
	timeout := fs.Duration("timeout", 3*time.Second, "per exchange timeout")
	_ = fs.Parse(args)
	if fs.NArg() != 1 {
		return errors.New("load: need ADDR")
	}
	if *dur > 10*time.Minute || *conns < 1 || *conns > 64 {
		return errors.New("load: -for at most 10m, -conns 1..64")
	}
	var (
		mu    sync.Mutex
		c     Counts
		peers = map[string]bool{}
		wg    sync.WaitGroup
	)
	start := time.Now()
	end := start.Add(*dur)
	for i := 0; i < *conns; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; time.Now().Before(end); n++ {
				t0 := time.Now()
				line, err := exchange(fs.Arg(0), fmt.Sprintf("load-%d", n), *timeout)
				mu.Lock()
				if err != nil {
					if from := t0.Sub(start).Milliseconds(); c.FirstFailMs == 0 || from < c.FirstFailMs {
						c.FirstFailMs = max(from, 1)
					}
					c.LastFailMs = max(c.LastFailMs, time.Since(start).Milliseconds())
				}
				switch {
				case err == nil:
					c.OK++
					if f := strings.Fields(line); len(f) > 0 && !peers[f[0]] {
						peers[f[0]] = true
						c.Peers = append(c.Peers, f[0])
					}
				case errors.Is(err, syscall.ECONNREFUSED):
					c.Refused++
				case errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.EOF) || errors.Is(err, syscall.EPIPE):
					c.Reset++
				case isTimeout(err):
					c.Timeout++
				default:
					c.Other++
				}
				if err != nil && len(c.Errors) < 5 {
					c.Errors = append(c.Errors, err.Error())
				}
				mu.Unlock()
				time.Sleep(*every)
			}
		}()
	}
	wg.Wait()
	return json.NewEncoder(os.Stdout).Encode(c)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func cat(args []string) error {
	if len(args) != 1 {
		return errors.New("cat: need FILE")
	}
	b, err := os.ReadFile(args[0])
	if err != nil {
		return err
	}
	_, err = os.Stdout.Write(b)
	return err
}
