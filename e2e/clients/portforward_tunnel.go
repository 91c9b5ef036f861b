// Command portforward_tunnel forwards through a CRI streaming server exactly as
// client-go's tunneling dialer does (kubectl port-forward since Kubernetes 1.30): a
// WebSocket (gorilla/websocket) offering only the subprotocol
// SPDY/3.1+portforward.k8s.io, each Write one binary message and reads running across
// message boundaries (client-go's TunnelingConnection), and inside it a SPDY/3.1 client
// session (docker/spdystream, which moby/spdystream continues), with the error and data
// streams client-go opens per connection. Built from Debian's packages, offline.
//
// Usage: portforward_tunnel URL PORT N REQUEST
//
// Opens N connections to PORT at once (requestID 0..N-1), sends REQUEST on each and
// prints, per connection, "data I B64" (everything read back) and "error I B64" (the
// error stream). "-" stands for no bytes. Exits 1 on a protocol failure.
package main

import (
	"encoding/base64"
	"fmt"
	"io"
	"io/ioutil"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/docker/spdystream"
	"github.com/gorilla/websocket"
)

const subprotocol = "SPDY/3.1+portforward.k8s.io"

// tunnel is a WebSocket as a net.Conn, framed as client-go's TunnelingConnection.
type tunnel struct {
	conn       *websocket.Conn
	inProgress io.Reader
}

func (t *tunnel) Read(p []byte) (int, error) {
	for {
		if t.inProgress == nil {
			kind, r, err := t.conn.NextReader()
			if err != nil {
				if websocket.IsCloseError(err, websocket.CloseNormalClosure) {
					return 0, io.EOF
				}
				return 0, err
			}
			if kind != websocket.BinaryMessage {
				return 0, fmt.Errorf("invalid message type received")
			}
			t.inProgress = r
		}
		n, err := t.inProgress.Read(p)
		if err == io.EOF {
			t.inProgress = nil
			if n == 0 {
				continue
			}
			return n, nil
		}
		return n, err
	}
}

func (t *tunnel) Write(p []byte) (int, error) {
	w, err := t.conn.NextWriter(websocket.BinaryMessage)
	if err != nil {
		return 0, err
	}
	defer w.Close()
	return w.Write(p)
}

func (t *tunnel) Close() error {
	msg := websocket.FormatCloseMessage(websocket.CloseNormalClosure, "")
	t.conn.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second))
	return t.conn.Close()
}

func (t *tunnel) LocalAddr() net.Addr                { return t.conn.LocalAddr() }
func (t *tunnel) RemoteAddr() net.Addr               { return t.conn.RemoteAddr() }
func (t *tunnel) SetDeadline(d time.Time) error      { return t.conn.UnderlyingConn().SetDeadline(d) }
func (t *tunnel) SetReadDeadline(d time.Time) error  { return t.conn.SetReadDeadline(d) }
func (t *tunnel) SetWriteDeadline(d time.Time) error { return t.conn.SetWriteDeadline(d) }

func b64(b []byte) string {
	if len(b) == 0 {
		return "-"
	}
	return base64.StdEncoding.EncodeToString(b)
}

func die(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

// forward is client-go's handleConnection for one local connection.
func forward(conn *spdystream.Connection, port string, id int, request string) (data, errText []byte, err error) {
	headers := http.Header{}
	headers.Set("streamType", "error")
	headers.Set("port", port)
	headers.Set("requestID", strconv.Itoa(id))
	errStream, err := conn.CreateStream(headers, nil, false)
	if err == nil {
		err = errStream.WaitTimeout(30 * time.Second)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("error stream: %v", err)
	}
	// client-go half-closes the error stream at once: only the server writes on it.
	errStream.Close()
	headers.Set("streamType", "data")
	dataStream, err := conn.CreateStream(headers, nil, false)
	if err == nil {
		err = dataStream.WaitTimeout(30 * time.Second)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("data stream: %v", err)
	}
	if _, err := dataStream.Write([]byte(request)); err != nil {
		return nil, nil, fmt.Errorf("writing: %v", err)
	}
	data, _ = ioutil.ReadAll(dataStream)
	errText, _ = ioutil.ReadAll(errStream)
	dataStream.Reset()
	return data, errText, nil
}

func main() {
	if len(os.Args) != 5 {
		die("usage: portforward_tunnel URL PORT N REQUEST")
	}
	// A hung session is a failure, not a hung test.
	time.AfterFunc(60*time.Second, func() { die("timed out after 60s") })
	url := strings.Replace(os.Args[1], "http", "ws", 1)
	port := os.Args[2]
	n, _ := strconv.Atoi(os.Args[3])
	dialer := websocket.Dialer{
		Subprotocols:     []string{subprotocol},
		HandshakeTimeout: 10 * time.Second,
		ReadBufferSize:   32*1024 + 1024,
		WriteBufferSize:  32*1024 + 1024,
	}
	ws, resp, err := dialer.Dial(url, nil)
	if err != nil {
		code := 0
		if resp != nil {
			code = resp.StatusCode
		}
		die("websocket: %v (HTTP %d)", err, code)
	}
	if ws.Subprotocol() != subprotocol {
		die("invalid protocol, expected %q, got %q", subprotocol, ws.Subprotocol())
	}
	t := &tunnel{conn: ws}
	conn, err := spdystream.NewConnection(t, false)
	if err != nil {
		die("spdy: %v", err)
	}
	go conn.Serve(spdystream.NoOpStreamHandler)
	type result struct{ data, errText []byte }
	results := make([]result, n)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failed error
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			data, errText, err := forward(conn, port, i, os.Args[4])
			mu.Lock()
			defer mu.Unlock()
			if err != nil && failed == nil {
				failed = err
			}
			results[i] = result{data, errText}
		}(i)
	}
	wg.Wait()
	if failed != nil {
		die("%v", failed)
	}
	if _, err := conn.Ping(); err != nil {
		die("ping through the tunnel: %v", err)
	}
	for i, r := range results {
		fmt.Printf("data %d %s\nerror %d %s\n", i, b64(r.data), i, b64(r.errText))
	}
	conn.Close()
	t.Close()
}
