package main

import (
	"encoding/json"
	"syscall"
	"unsafe"
)

type syscall_RawConn = syscall.RawConn

func unsafePointer[T any](p *T) unsafe.Pointer { return unsafe.Pointer(p) }

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }
