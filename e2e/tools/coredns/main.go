// Command coredns is CoreDNS (github.com/coredns/coredns, the release
// go.mod pins) with the plugins the local cluster's Corefile uses, linked
// in the way CoreDNS documents for embedding: blank imports register the
// plugins, and dnsserver.Directives (CoreDNS's own, full list) orders them.
// Nothing here forwards to an upstream resolver: the cluster answers only
// its own names.
package main

import (
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/metrics"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
)

func main() {
	coremain.Run()
}
