// Command cri_raw_client is a gRPC client built from Debian's grpc-go (GOPATH mode, no
// network), used by berth's e2e tests as a CRI client berth did not write.
//
// It dials the socket path exactly as kubelet's remote runtime client did up to
// Kubernetes 1.26, so grpc-go sends that path as the HTTP/2 :authority. It relays raw
// protobuf bytes: the test encodes every request and decodes every answer, so no
// generated Go stubs are needed.
//
// Usage: cri_raw_client SOCKET. One command per stdin line, one answer per stdout line:
//
//	unary METHOD B64            -> ok B64 | err CODE B64(message)   ("-" = no bytes)
//	stream METHOD B64 N MILLIS  -> msg B64 (up to N), then end CODE B64(message)
//
// A stream ends after N messages (the client cancels it, code 1), at the server's end of
// stream (code 0), after MILLIS (code 4, deadline) or with the server's error.
package main

import (
	"bufio"
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// rawCodec passes bytes through; grpc-go still frames them and sends
// content-type application/grpc.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	p := v.(*[]byte)
	*p = append((*p)[:0], data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

func dialUnix(ctx context.Context, addr string) (net.Conn, error) {
	return (&net.Dialer{}).DialContext(ctx, "unix", addr)
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: cri_raw_client SOCKET")
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	conn, err := grpc.DialContext(ctx, os.Args[1],
		grpc.WithInsecure(),
		grpc.WithBlock(),
		grpc.WithContextDialer(dialUnix),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16<<20), grpc.ForceCodec(rawCodec{})))
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial:", err)
		os.Exit(1)
	}
	defer conn.Close()
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 64<<20)
	out := bufio.NewWriter(os.Stdout)
	for in.Scan() {
		f := strings.Fields(in.Text())
		switch {
		case len(f) == 3 && f[0] == "unary":
			unary(conn, f[1], f[2], out)
		case len(f) == 5 && f[0] == "stream":
			n, _ := strconv.Atoi(f[3])
			ms, _ := strconv.Atoi(f[4])
			stream(conn, f[1], f[2], n, time.Duration(ms)*time.Millisecond, out)
		default:
			fmt.Fprintf(out, "err %d %s\n", codes.InvalidArgument, b64([]byte("bad command")))
		}
		out.Flush()
	}
}

// b64 writes "-" for no bytes, so that every line has all its fields.
func b64(b []byte) string {
	if len(b) == 0 {
		return "-"
	}
	return base64.StdEncoding.EncodeToString(b)
}

func decode(s string) []byte {
	if s == "-" {
		return nil
	}
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return nil
	}
	return b
}

func fail(out *bufio.Writer, word string, err error) {
	st := status.Convert(err)
	fmt.Fprintf(out, "%s %d %s\n", word, st.Code(), b64([]byte(st.Message())))
}

func unary(conn *grpc.ClientConn, method, req string, out *bufio.Writer) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	in, resp := decode(req), []byte{}
	if err := conn.Invoke(ctx, method, &in, &resp); err != nil {
		fail(out, "err", err)
		return
	}
	fmt.Fprintf(out, "ok %s\n", b64(resp))
}

func stream(conn *grpc.ClientConn, method, req string, n int, wait time.Duration, out *bufio.Writer) {
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	desc := &grpc.StreamDesc{ServerStreams: true}
	s, err := conn.NewStream(ctx, desc, method)
	if err == nil {
		in := decode(req)
		err = s.SendMsg(&in)
	}
	if err == nil {
		err = s.CloseSend()
	}
	for i := 0; err == nil && i < n; i++ {
		msg := []byte{}
		if err = s.RecvMsg(&msg); err == nil {
			fmt.Fprintf(out, "msg %s\n", b64(msg))
			out.Flush()
		}
	}
	switch {
	case err == nil:
		fmt.Fprintf(out, "end %d %s\n", codes.Canceled, b64([]byte("enough messages")))
	case err == io.EOF:
		fmt.Fprintf(out, "end 0 %s\n", b64(nil))
	default:
		fail(out, "end", err)
	}
}
