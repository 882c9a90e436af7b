package hbone

import (
	"bytes"
	"io"
	"net"
	"strconv"
	"testing"
	"time"

	"golang.org/x/net/http2/hpack"
)

// FuzzParseRequest: any header list gives a request or an error, never a
// panic, and an accepted CONNECT always has an authority and no path.
func FuzzParseRequest(f *testing.F) {
	f.Add(":method\x00CONNECT\x00:authority\x0010.0.0.1:80\x00baggage\x00a=b")
	f.Add(":method\x00GET\x00:path\x00/\x00:scheme\x00https")
	f.Add(":authority\x00x\x00:method\x00CONNECT\x00:path\x00/")
	f.Add(":method\x00CONNECT\x00:authority\x00[fd00::1]:8080\x00Forwarded\x00for=x")
	f.Fuzz(func(t *testing.T, s string) {
		parts := bytes.Split([]byte(s), []byte{0})
		var fields []hpack.HeaderField
		for i := 0; i+1 < len(parts); i += 2 {
			fields = append(fields, hpack.HeaderField{Name: string(parts[i]), Value: string(parts[i+1])})
		}
		r, err := parseRequest(fields)
		if err != nil {
			return
		}
		if r.Method == "CONNECT" && r.Protocol == "" && (r.Authority == "" || r.Path != "") {
			t.Fatalf("accepted bad CONNECT %+v", r)
		}
	})
}

// FuzzParseResponse: any response header list gives a usable status or
// a reason, never a panic; what it accepts is one :status of three
// digits, never 101, and a 1xx only without END_STREAM.
func FuzzParseResponse(f *testing.F) {
	f.Add(":status\x00200", false)
	f.Add(":status\x00204\x00server\x00x", true)
	f.Add(":status\x00103\x00link\x00</x.css>; rel=preload", false)
	f.Add(":status\x00100", true)
	f.Add(":status\x00101", false)
	f.Add(":status\x00200\x00:status\x00200", false)
	f.Add(":status\x00+20", false)
	f.Add(":status\x00099", false)
	f.Add("server\x00nobody", false)
	f.Fuzz(func(t *testing.T, s string, end bool) {
		parts := bytes.Split([]byte(s), []byte{0})
		var fields []hpack.HeaderField
		for i := 0; i+1 < len(parts); i += 2 {
			fields = append(fields, hpack.HeaderField{Name: string(parts[i]), Value: string(parts[i+1])})
		}
		st, info, bad := parseResponse(fields, end)
		if bad != nil {
			if st != 0 || info {
				t.Fatalf("status %d, informational %v with error %v", st, info, bad)
			}
			return
		}
		var n int
		var v string
		for _, f := range fields {
			if f.Name == ":status" {
				n++
				v = f.Value
			}
		}
		if n != 1 || strconv.Itoa(st) != v || st < 100 || st == 101 || info != (st < 200) || info && end {
			t.Fatalf("accepted %q (end %v) as %d, informational %v", s, end, st, info)
		}
	})
}

// fuzzConn feeds fixed bytes to a connection and swallows its writes.
type fuzzConn struct {
	r *bytes.Reader
}

func (c *fuzzConn) Read(p []byte) (int, error)       { return c.r.Read(p) }
func (c *fuzzConn) Write(p []byte) (int, error)      { return len(p), nil }
func (c *fuzzConn) Close() error                     { return nil }
func (c *fuzzConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c *fuzzConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c *fuzzConn) SetDeadline(time.Time) error      { return nil }
func (c *fuzzConn) SetReadDeadline(time.Time) error  { return nil }
func (c *fuzzConn) SetWriteDeadline(time.Time) error { return nil }

func frameBytes(typ, flags uint8, id uint32, p []byte) []byte {
	return appendFrame(nil, typ, flags, id, p)
}

// FuzzServerFrames runs the server's frame reader on arbitrary bytes
// after a valid preface: it must end with an error, never panic or hang.
func FuzzServerFrames(f *testing.F) {
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	enc.WriteField(hpack.HeaderField{Name: ":method", Value: "CONNECT"})
	enc.WriteField(hpack.HeaderField{Name: ":authority", Value: "10.0.0.1:80"})
	settings := appendSettings(nil, setting{settingInitialWindowSize, 1 << 20})
	seed := append([]byte{}, settings...)
	seed = append(seed, frameBytes(frameHeaders, flagEndHeaders, 1, hb.Bytes())...)
	seed = append(seed, frameBytes(frameData, 0, 1, []byte("hello"))...)
	seed = append(seed, frameBytes(frameData, flagPadded|flagEndStream, 1, []byte{2, 'h', 'i', 0, 0})...)
	seed = append(seed, appendWindowUpdate(nil, 1, 100)...)
	seed = append(seed, frameBytes(framePing, 0, 0, make([]byte, 8))...)
	seed = append(seed, appendRST(nil, 1, ErrCodeCancel)...)
	seed = append(seed, appendGoAway(nil, 0, ErrCodeNo, "bye")...)
	f.Add(seed)
	f.Add(append(append([]byte{}, settings...), frameBytes(frameHeaders, 0, 1, hb.Bytes()[:3])...))
	f.Add(append(append([]byte{}, settings...), frameBytes(frameData, 0, 3, []byte("x"))...))
	f.Add([]byte{0, 0, 0, 4, 0, 0, 0, 0, 0})
	// The abuse paths (abuse_test.go): a reset stream, empty and unknown
	// frames, PRIORITY, a duplicate setting, RST_STREAM on an idle stream.
	abuse := append([]byte{}, settings...)
	abuse = append(abuse, frameBytes(frameHeaders, flagEndHeaders, 1, hb.Bytes())...)
	abuse = append(abuse, appendRST(nil, 1, ErrCodeCancel)...)
	abuse = append(abuse, frameBytes(frameHeaders, 0, 3, hb.Bytes())...)
	abuse = append(abuse, frameBytes(frameContinuation, 0, 3, nil)...)
	abuse = append(abuse, frameBytes(frameContinuation, flagEndHeaders, 3, nil)...)
	abuse = append(abuse, frameBytes(frameData, 0, 3, nil)...)
	abuse = append(abuse, frameBytes(0x20, 0, 0, []byte("x"))...)
	abuse = append(abuse, frameBytes(framePriority, 0, 5, []byte{0, 0, 0, 0, 16})...)
	abuse = append(abuse, appendWindowUpdate(nil, 3, 1)...)
	f.Add(abuse)
	f.Add(append(append([]byte{}, settings...), appendRST(nil, 9, ErrCodeCancel)...))
	f.Add(appendSettings(nil, setting{settingInitialWindowSize, 1}, setting{settingInitialWindowSize, 2}))
	f.Fuzz(func(t *testing.T, b []byte) {
		in := append([]byte(clientPreface), b...)
		c, err := NewServerConn(&fuzzConn{r: bytes.NewReader(in)}, nil, Config{PingInterval: -1}, func(s *Stream) {
			s.Respond(200, nil)
			io.Copy(io.Discard, s)
			s.Close()
		})
		if err != nil {
			return
		}
		select {
		case <-c.Done():
		case <-time.After(10 * time.Second):
			t.Fatal("server did not end at EOF")
		}
	})
}

// FuzzClientFrames: the client's reader on arbitrary server bytes.
func FuzzClientFrames(f *testing.F) {
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	enc.WriteField(hpack.HeaderField{Name: ":status", Value: "200"})
	seed := appendSettings(nil, setting{settingMaxFrameSize, 1 << 20})
	seed = append(seed, frameBytes(frameHeaders, flagEndHeaders, 1, hb.Bytes())...)
	seed = append(seed, frameBytes(frameData, flagEndStream, 1, []byte("resp"))...)
	f.Add(seed)
	// Informational responses ahead of the final one (skipped, bounded),
	// a 101, a 1xx ending the stream, and a 204 that opens the tunnel.
	block := func(st string) []byte {
		var b bytes.Buffer
		hpack.NewEncoder(&b).WriteField(hpack.HeaderField{Name: ":status", Value: st})
		return b.Bytes()
	}
	info := appendSettings(nil)
	info = append(info, frameBytes(frameHeaders, flagEndHeaders, 1, block("100"))...)
	info = append(info, frameBytes(frameHeaders, flagEndHeaders, 1, block("103"))...)
	info = append(info, frameBytes(frameHeaders, flagEndHeaders, 1, block("204"))...)
	info = append(info, frameBytes(frameData, flagEndStream, 1, []byte("resp"))...)
	f.Add(info)
	for _, st := range []string{"101", "100"} {
		f.Add(append(appendSettings(nil), frameBytes(frameHeaders, flagEndHeaders|flagEndStream, 1, block(st))...))
	}
	flood := appendSettings(nil)
	for i := 0; i <= maxInformational; i++ {
		flood = append(flood, frameBytes(frameHeaders, flagEndHeaders, 1, block("103"))...)
	}
	f.Add(flood)
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := NewClientConn(&fuzzConn{r: bytes.NewReader(b)}, nil, Config{PingInterval: -1})
		if err != nil {
			return
		}
		if s, err := c.OpenStream("10.0.0.1:80", nil); err == nil {
			go io.Copy(io.Discard, s)
		}
		select {
		case <-c.Done():
		case <-time.After(10 * time.Second):
			t.Fatal("client did not end at EOF")
		}
	})
}
