package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"syscall"
	"time"

	"github.com/idcni/idcni/identity"
)

// ErrNoAgent means nothing listens on the socket: the caller should fall
// back to writing the maps itself, or report that the agent is down.
var ErrNoAgent = errors.New("no idcni-agent is listening")

// Client talks to the agent over its unix socket.
type Client struct {
	socket string
	http   *http.Client
}

// NewClient returns a client for the agent at socket (DefaultSocket if
// empty).
func NewClient(socket string) *Client {
	if socket == "" {
		socket = DefaultSocket
	}
	return &Client{
		socket: socket,
		http: &http.Client{Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", socket)
			},
		}},
	}
}

// Socket returns the socket path the client uses.
func (c *Client) Socket() string { return c.socket }

// Running reports whether an agent answers on the socket within a short
// time. A socket file left behind by a dead agent counts as not running.
func (c *Client) Running(ctx context.Context) bool {
	if _, err := os.Stat(c.socket); err != nil {
		return false
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	return c.do(ctx, http.MethodGet, PathHealth, nil, nil) == nil
}

// Answering reports whether an agent answers on the socket within a short
// time, ready or still starting (Running is only true once it is ready).
// The CLIs send their changes to an answering agent, so a starting one
// refuses them with its own message rather than the CLI writing the maps
// behind its back.
func (c *Client) Answering(ctx context.Context) bool {
	if _, err := os.Stat(c.socket); err != nil {
		return false
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://agent"+PathHealth, nil)
	if err != nil {
		return false
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return true
}

// RegisterEndpoint asks the agent to resolve and enforce the endpoint; it
// returns once the endpoint's policy is in the maps.
func (c *Client) RegisterEndpoint(ctx context.Context, req EndpointRequest) (EndpointResponse, error) {
	var resp EndpointResponse
	err := c.do(ctx, http.MethodPut, PathEndpoints+url.PathEscape(req.ContainerID), req, &resp)
	return resp, err
}

// DeleteEndpoint tells the agent the container is gone. Unknown containers
// are not an error.
func (c *Client) DeleteEndpoint(ctx context.Context, containerID string) error {
	return c.do(ctx, http.MethodDelete, PathEndpoints+url.PathEscape(containerID), nil, nil)
}

// AddManualEndpoint binds an IP to a manual identity.
func (c *Client) AddManualEndpoint(ctx context.Context, ep ManualEndpoint) error {
	return c.do(ctx, http.MethodPut, PathManualEndpoints, ep, nil)
}

// DeleteManualEndpoint removes the manual binding of ip.
func (c *Client) DeleteManualEndpoint(ctx context.Context, ip string) error {
	return c.do(ctx, http.MethodDelete, PathManualEndpoints+"?ip="+url.QueryEscape(ip), nil, nil)
}

// ManualEndpoints lists the manual bindings.
func (c *Client) ManualEndpoints(ctx context.Context) ([]ManualEndpoint, error) {
	var out []ManualEndpoint
	err := c.do(ctx, http.MethodGet, PathManualEndpoints, nil, &out)
	return out, err
}

// AddManualRule adds a rule from policyctl allow/deny.
func (c *Client) AddManualRule(ctx context.Context, r RuleRequest) error {
	return c.do(ctx, http.MethodPost, PathManualRules, r, nil)
}

// DeleteManualRule removes the rules r names.
func (c *Client) DeleteManualRule(ctx context.Context, r RuleRequest) error {
	return c.do(ctx, http.MethodPost, PathManualRulesDel, r, nil)
}

// ManualRules lists the manual rules.
func (c *Client) ManualRules(ctx context.Context) (RuleList, error) {
	var out RuleList
	err := c.do(ctx, http.MethodGet, PathManualRules, nil, &out)
	return out, err
}

// SetDebug switches the kernel trace lines on or off.
func (c *Client) SetDebug(ctx context.Context, on bool) error {
	return c.do(ctx, http.MethodPut, PathDebug, Debug{On: on}, nil)
}

// Identities lists what every identity number in use stands for on the
// agent's node.
func (c *Client) Identities(ctx context.Context) (IdentityList, error) {
	var out IdentityList
	err := c.do(ctx, http.MethodGet, PathIdentities, nil, &out)
	return out, err
}

// Identity returns what id stands for on the agent's node; the agent's
// error says why when it stands for nothing.
func (c *Client) Identity(ctx context.Context, id identity.ID) (Identity, error) {
	var out Identity
	err := c.do(ctx, http.MethodGet, PathIdentities+"/"+strconv.FormatUint(uint64(id), 10), nil, &out)
	return out, err
}

// Events opens the verdict event stream; the caller reads NDJSON lines from
// the returned body and closes it. query holds filters (pod, namespace,
// identity, verdict).
func (c *Client) Events(ctx context.Context, query url.Values) (io.ReadCloser, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://agent"+PathEvents+"?"+query.Encode(), nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, c.dialError(err)
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		return nil, readError(resp)
	}
	return resp.Body, nil
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://agent"+path, body)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		return c.dialError(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return readError(resp)
	}
	if out == nil {
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("decode agent answer to %s %s: %w", method, path, err)
	}
	return nil
}

func (c *Client) dialError(err error) error {
	if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("%w on %s", ErrNoAgent, c.socket)
	}
	return fmt.Errorf("idcni-agent on %s: %w", c.socket, err)
}

// readError turns an error answer into an error carrying the agent's
// message verbatim, so the plugin can pass it on to the runtime.
func readError(resp *http.Response) error {
	var e Error
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if json.Unmarshal(b, &e) != nil || e.Message == "" {
		e.Message = fmt.Sprintf("%s: %s", resp.Status, bytes.TrimSpace(b))
	}
	return errors.New(e.Message)
}
