package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"
)

// The demo's workloads are this same binary: "serve" is an app that tells
// every client which address it sees the client come from; "get" is a
// client that prints what it got. They know nothing of Ambit: the mesh is
// invisible to them, which is the point.

func serve(args []string) error {
	if len(args) != 2 {
		return fmt.Errorf("usage: serve <name> <addr>")
	}
	name, addr := args[0], args[1]
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	return http.Serve(l, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20))
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		fmt.Fprintf(w, "hello from %s: you came from %s, you said %q\n", name, host, body)
	}))
}

func get(args []string) error {
	if len(args) != 2 {
		return fmt.Errorf("usage: get <url> <message>")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, args[0], strings.NewReader(args[1]))
	if err != nil {
		return err
	}
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	os.Stdout.Write(b)
	return nil
}
