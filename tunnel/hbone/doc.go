// Package hbone is a lean HTTP/2 CONNECT transport, client and server,
// for HBONE: one TLS connection carries many CONNECT streams, each a TCP
// connection of an app.
//
// It implements only what HBONE needs of RFC 9113, and that exactly:
// the preface, SETTINGS, HEADERS (+CONTINUATION, HPACK via x/net's hpack),
// DATA, WINDOW_UPDATE, RST_STREAM, PING and GOAWAY; no server push, no
// priorities, no request bodies other than the tunnelled bytes. Owning the
// framing lets the data path do what a general HTTP/2 library cannot:
//
//   - Reads from the app socket go straight into a pooled buffer that has
//     room for the 9-byte frame header in front, so a DATA frame is sent
//     with one tls.Write and no copy; while an app is idle no buffer is
//     held at all (the read waits in the poller before taking one).
//   - TLS writes of one burst are corked into a single write(2) instead of
//     one per 16 KiB record.
//   - DATA payloads are read from TLS directly into pooled chunks and
//     written to the app with writev, chunks and all.
//   - The connection read loop never blocks on a write (control frames go
//     through a queue), so two peers can never deadlock on full sockets.
//
// Flow control is end to end: a stream's receive buffer never exceeds the
// window we advertised (default 4 MiB per stream, 16 MiB per connection,
// as ztunnel), and window is only returned once the app has taken the
// bytes, so a stalled reader stalls its writer instead of growing memory.
package hbone
