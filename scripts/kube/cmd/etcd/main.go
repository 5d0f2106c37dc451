// Command etcd is etcd's own server (go.etcd.io/etcd/server/v3/etcdmain) at the
// version k8s.io/kubernetes requires, so the API server meets the etcd it was tested with.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
