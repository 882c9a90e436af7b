package main

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
)

// newLogger logs to stderr (the runtime keeps it with the error) and, when
// configured, appends to a node-local file. Never stdout: that is the CNI
// result. A log file that cannot be opened is reported on stderr and
// otherwise ignored; logging must not fail a pod.
//
// The handlers are built, and the file opened, only when the first record
// at an enabled level is written: most execs (pods the agent skips, DEL,
// CHECK at the default level) log nothing, and start-up is most of what
// the plugin costs.
func newLogger(c *Config) (*slog.Logger, func()) {
	o := &logOutput{cfg: c}
	return slog.New(&lazyHandler{out: o, level: c.LogLevel}).With("plugin", "ambit-cni"), o.close
}

// logOutput is the real handler behind every lazyHandler of one logger.
type logOutput struct {
	cfg  *Config
	once sync.Once
	h    slog.Handler
	file io.Closer
}

func (o *logOutput) handler() slog.Handler {
	o.once.Do(func() {
		opts := &slog.HandlerOptions{Level: o.cfg.LogLevel}
		stderr := slog.NewTextHandler(os.Stderr, opts)
		o.h = stderr
		if o.cfg.LogFile == "" {
			return
		}
		f, err := openLogFile(o.cfg.LogFile)
		if err != nil {
			slog.New(stderr).Warn("cannot open log file", "file", o.cfg.LogFile, "err", err)
			return
		}
		o.h, o.file = slog.NewMultiHandler(stderr, slog.NewJSONHandler(f, opts)), f
	})
	return o.h
}

// close closes the log file if one was opened; it opens nothing.
func (o *logOutput) close() {
	o.once.Do(func() {}) // nothing logged so far: nothing to open later
	if o.file != nil {
		o.file.Close()
	}
}

// lazyHandler records With/WithGroup and replays them on the real handler
// the first time a record is handled. Enabled needs no handler: both real
// ones use the configured level.
type lazyHandler struct {
	out    *logOutput
	level  slog.Level
	parent *lazyHandler
	attrs  []slog.Attr
	group  string
	once   sync.Once
	h      slog.Handler
}

func (l *lazyHandler) Enabled(_ context.Context, level slog.Level) bool { return level >= l.level }

func (l *lazyHandler) Handle(ctx context.Context, r slog.Record) error {
	return l.real().Handle(ctx, r)
}

func (l *lazyHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	if len(attrs) == 0 {
		return l
	}
	return &lazyHandler{out: l.out, level: l.level, parent: l, attrs: attrs}
}

func (l *lazyHandler) WithGroup(name string) slog.Handler {
	if name == "" {
		return l
	}
	return &lazyHandler{out: l.out, level: l.level, parent: l, group: name}
}

func (l *lazyHandler) real() slog.Handler {
	l.once.Do(func() {
		switch {
		case l.parent == nil:
			l.h = l.out.handler()
		case l.group != "":
			l.h = l.parent.real().WithGroup(l.group)
		default:
			l.h = l.parent.real().WithAttrs(l.attrs)
		}
	})
	return l.h
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
