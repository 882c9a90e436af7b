package hbone

import "sync/atomic"

// bufferedBytes counts received bytes waiting for apps, process-wide.
var bufferedBytes atomic.Int64

// BufferedBytes is the number of received bytes all streams hold for
// their apps right now: the memory flow control bounds.
func BufferedBytes() int64 { return bufferedBytes.Load() }
