// Package manifests embeds the files binaries need at run time, so what the
// agent installs is exactly what this folder ships.
package manifests

import _ "embed"

// CNIConflist is manifests/cni/10-idcni.conflist.
//
//go:embed cni/10-idcni.conflist
var CNIConflist []byte
