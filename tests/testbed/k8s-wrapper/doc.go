// Package wrapper is a build-only module: it pins k8s.io/kubernetes and maps every staging
// module to its published version, so `go build k8s.io/kubernetes/cmd/<component>` works.
// build.sh keeps go.mod in step with tests/testbed/versions.env.
package wrapper
