// Package pki is the throw-away certificate authority of a test cluster
// (e2e/internal/kube, e2e/cluster): a CA, leaf certificates, key pairs and
// kubeconfigs, all as PEM files in one directory.
package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// Authority is the throw-away CA of one cluster: nothing outside the cluster
// trusts it, and it trusts nothing else. ECDSA P-256 keys are generated in
// microseconds, which keeps a dozen certificates out of the start-up time.
type Authority struct {
	dir  string
	cert *x509.Certificate
	key  crypto.Signer
	// CertFile and KeyFile are the CA's PEM files in dir.
	CertFile, KeyFile string
}

// validity covers a long-lived `make cluster` (a week) while keeping a
// leaked key short-lived.
const validity = 7 * 24 * time.Hour

// New creates a CA in dir.
func New(dir string) (*Authority, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	// A minute in the past: a certificate checked in the second it was made
	// must not be "not yet valid".
	now := time.Now().Add(-time.Minute)
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "idcni-cluster-ca"},
		NotBefore:             now,
		NotAfter:              now.Add(validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	a := &Authority{dir: dir, cert: cert, key: key,
		CertFile: filepath.Join(dir, "ca.crt"), KeyFile: filepath.Join(dir, "ca.key")}
	if err := writePEM(a.CertFile, "CERTIFICATE", der); err != nil {
		return nil, err
	}
	if err := writeKey(a.KeyFile, key); err != nil {
		return nil, err
	}
	return a, nil
}

// leaf describes one certificate the CA issues.
// Leaf describes a certificate to issue.
type Leaf struct {
	Name   string // file stem
	CN     string
	Orgs   []string
	DNS    []string
	IPs    []net.IP
	Server bool
	Client bool
}

// Issue writes dir/<name>.crt and .key and returns their paths.
func (a *Authority) Issue(l Leaf) (certFile, keyFile string, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", "", err
	}
	now := time.Now().Add(-time.Minute)
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: l.CN, Organization: l.Orgs},
		NotBefore:    now,
		NotAfter:     now.Add(validity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		DNSNames:     l.DNS,
		IPAddresses:  l.IPs,
	}
	if l.Server {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
	}
	if l.Client {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageClientAuth)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.cert, key.Public(), a.key)
	if err != nil {
		return "", "", fmt.Errorf("sign %s: %w", l.Name, err)
	}
	certFile = filepath.Join(a.dir, l.Name+".crt")
	keyFile = filepath.Join(a.dir, l.Name+".key")
	if err := writePEM(certFile, "CERTIFICATE", der); err != nil {
		return "", "", err
	}
	return certFile, keyFile, writeKey(keyFile, key)
}

// KeyPair writes a bare key pair (the service account token signer).
func (a *Authority) KeyPair(name string) (keyFile, pubFile string, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", "", err
	}
	pub, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		return "", "", err
	}
	keyFile, pubFile = filepath.Join(a.dir, name+".key"), filepath.Join(a.dir, name+".pub")
	if err := writeKey(keyFile, key); err != nil {
		return "", "", err
	}
	return keyFile, pubFile, writePEM(pubFile, "PUBLIC KEY", pub)
}

// Kubeconfig writes a kubeconfig for server that authenticates with a
// client certificate of the CA for user cn in orgs, and returns its path.
func (a *Authority) Kubeconfig(path, server, name, cn string, orgs ...string) (string, error) {
	cert, key, err := a.Issue(Leaf{Name: name, CN: cn, Orgs: orgs, Client: true})
	if err != nil {
		return "", err
	}
	return path, WriteKubeconfig(path, server, a.CertFile, cert, key)
}

// WriteKubeconfig writes a kubeconfig for server and a client certificate. It refers to the PEM files by path. Strings are JSON-quoted,
// which YAML reads as double-quoted scalars, so no path breaks the file.
func WriteKubeconfig(path, server, ca, cert, key string) error {
	q := func(s string) string { b, _ := json.Marshal(s); return string(b) }
	content := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: idcni
  cluster:
    server: %s
    certificate-authority: %s
users:
- name: idcni
  user:
    client-certificate: %s
    client-key: %s
contexts:
- name: idcni
  context:
    cluster: idcni
    user: idcni
current-context: idcni
`, q(server), q(ca), q(cert), q(key))
	return os.WriteFile(path, []byte(content), 0o600)
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 126))
	if err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return n
}

func writeKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	return writePEM(path, "PRIVATE KEY", der)
}

// writePEM uses mode 0600 for every file: keys must not be readable by
// others, and certificates lose nothing by it.
func writePEM(path, typ string, der []byte) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600)
}
