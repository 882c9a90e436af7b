package wall

import "time"

type conn struct{ last int64 }

func (c *conn) touch() { c.last = time.Now().UnixNano() }

func since(n int64) time.Duration { return time.Since(time.Unix(0, n)) }
