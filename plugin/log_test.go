package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLogFileRotatesAndNeverStdout(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "cni.log")
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		t.Fatal(err)
	}
	big := strings.Repeat("x", maxLogSize+1)
	if err := os.WriteFile(path, []byte(big), 0o640); err != nil {
		t.Fatal(err)
	}
	c, err := parseConfig([]byte(`{"cniVersion":"1.0.0","logFile":"` + path + `"}`))
	if err != nil {
		t.Fatal(err)
	}
	// Anything written to stdout would corrupt the CNI result.
	r, w, _ := os.Pipe()
	stdout := os.Stdout
	os.Stdout = w
	log, closeLog := newLogger(c)
	log.Info("hello")
	closeLog()
	os.Stdout = stdout
	w.Close()
	if b, _ := readAll(r); len(b) != 0 {
		t.Fatalf("logger wrote to stdout: %q", b)
	}
	old, err := os.Stat(path + ".1")
	if err != nil || old.Size() != int64(len(big)) {
		t.Fatalf("old log not rotated to .1: %v", err)
	}
	b, err := os.ReadFile(path)
	if err != nil || !strings.Contains(string(b), `"msg":"hello"`) || len(b) > 1000 {
		t.Fatalf("new log: %v %q", err, b)
	}
}

func readAll(f *os.File) ([]byte, error) {
	defer f.Close()
	var out []byte
	buf := make([]byte, 4096)
	for {
		n, err := f.Read(buf)
		out = append(out, buf[:n]...)
		if err != nil {
			return out, nil
		}
	}
}
