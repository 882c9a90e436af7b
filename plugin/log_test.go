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

// Nothing at an enabled level, nothing opened: the file (and its
// directory) appear only with the first record that is written, and
// carry every attribute and group added before it.
func TestLogFileOpenedOnFirstRecord(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "cni.log")
	c, err := parseConfig([]byte(`{"cniVersion":"1.0.0","logFile":"` + path + `"}`))
	if err != nil {
		t.Fatal(err)
	}
	log, closeLog := newLogger(c)
	log = log.With("cmd", "ADD")
	log.Debug("not at the configured level")
	closeLog()
	if _, err := os.Stat(filepath.Dir(path)); !os.IsNotExist(err) {
		t.Fatalf("log directory created although nothing was logged: %v", err)
	}

	log, closeLog = newLogger(c)
	log = log.With("cmd", "DEL").WithGroup("g").With("k", 1)
	log.Debug("dropped")
	log.Warn("kept", "x", "y")
	closeLog()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	want := `"msg":"kept","plugin":"ambit-cni","cmd":"DEL","g":{"k":1,"x":"y"}}`
	if !strings.Contains(string(b), want) || strings.Contains(string(b), "dropped") || strings.Count(string(b), "\n") != 1 {
		t.Fatalf("log file %q, want one line with %s", b, want)
	}
}
