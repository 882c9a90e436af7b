package main

// Small helpers the tests share: aliases that keep harness_test.go free
// of unsafe and syscall imports.

import (
	"encoding/json"
	"syscall"
	"unsafe"
)

type syscall_RawConn = syscall.RawConn

func unsafePointer[T any](p *T) unsafe.Pointer { return unsafe.Pointer(p) }

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }
