package agent

import (
	"bufio"
	"net"
	"net/http"
	"testing"
	"time"
)

// A stream (GET /v1/events) outlives the server's read and write
// deadlines: streaming lifts them, so neither the write deadline cuts the
// stream nor the read deadline cancels the request's context. The
// deadlines here are short so that the stream provably runs past both;
// the handler waits on its own clock, the test asserts no duration.
func TestStreamingOutlivesDeadlines(t *testing.T) {
	const deadline = 50 * time.Millisecond
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	handler := func(w http.ResponseWriter, r *http.Request) {
		flusher := w.(http.Flusher)
		for i := range 3 {
			select {
			case <-r.Context().Done():
				return // the context was cancelled: the test sees a short stream
			case <-time.After(4 * deadline):
			}
			if _, err := w.Write([]byte{'0' + byte(i), '\n'}); err != nil {
				return
			}
			flusher.Flush()
		}
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/stream", streaming(handler))
	mux.HandleFunc("/plain", handler)
	srv := &http.Server{Handler: mux, ReadTimeout: deadline, WriteTimeout: deadline, ReadHeaderTimeout: deadline}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { srv.Close() })

	// lines counts the lines a GET of path delivers; a request that
	// fails before any counts none.
	lines := func(path string) int {
		resp, err := http.Get("http://" + l.Addr().String() + path)
		if err != nil {
			return 0
		}
		defer resp.Body.Close()
		n := 0
		for sc := bufio.NewScanner(resp.Body); sc.Scan(); {
			n++
		}
		return n
	}
	if n := lines("/stream"); n != 3 {
		t.Errorf("stream delivered %d of 3 lines past the deadlines", n)
	}
	// The same handler without streaming is cut: what the wrapper is for.
	if n := lines("/plain"); n == 3 {
		t.Errorf("plain handler delivered every line past the deadlines; the test shows nothing")
	}
}
