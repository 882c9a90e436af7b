package main

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
)

// newLogger logs to stderr (the runtime keeps it with the error) and, when
// configured, appends to a node-local file. Never stdout: that is the CNI
// result. A log file that cannot be opened is reported on stderr and
// otherwise ignored; logging must not fail a pod.
func newLogger(c *Config) (*slog.Logger, func()) {
	opts := &slog.HandlerOptions{Level: c.LogLevel}
	handlers := []slog.Handler{slog.NewTextHandler(os.Stderr, opts)}
	closer := func() {}
	if c.LogFile != "" {
		f, err := openLogFile(c.LogFile)
		if err != nil {
			slog.New(handlers[0]).Warn("cannot open log file", "file", c.LogFile, "err", err)
		} else {
			handlers = append(handlers, slog.NewJSONHandler(f, opts))
			closer = func() { f.Close() }
		}
	}
	return slog.New(slog.NewMultiHandler(handlers...)).With("plugin", "ambit-cni"), closer
}

// maxLogSize bounds the log file: past it, the file is renamed to
// "<file>.1" (replacing the previous one) and a new one is started, so a
// node keeps at most twice this much. Concurrent plugin runs may race on
// the rename; the worst case is one rotation's worth of lost history.
const maxLogSize = 10 << 20

func openLogFile(path string) (io.WriteCloser, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, err
	}
	if st, err := os.Stat(path); err == nil && st.Size() > maxLogSize {
		_ = os.Rename(path, path+".1")
	}
	return os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
}
