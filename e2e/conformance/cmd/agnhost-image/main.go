// Command agnhost-image prints the image reference the upstream e2e suite
// of this module's k8s.io/kubernetes runs agnhost from: the suite's own
// function computes it, so the image imported into the nodes has exactly
// the tag its pods name (a registry override in KUBE_TEST_REPO_LIST
// included).
package main

import (
	"fmt"

	imageutils "k8s.io/kubernetes/test/utils/image"
)

func main() {
	fmt.Println(imageutils.GetE2EImage(imageutils.Agnhost))
}
