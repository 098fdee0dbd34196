// Command etcd is the etcd server: go.etcd.io/etcd/server/v3 carries relative replaces, so
// `go install` of it is refused; this wrapper calls its entry point instead.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
