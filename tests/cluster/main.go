// Command cluster is the real Kubernetes control plane of Balancing's cluster tests: embedded etcd, the real
// kube-apiserver and the controllers that Services need (EndpointSlice, EndpointSliceMirroring, namespace,
// service account and service-account token), built from the Kubernetes Go modules at one release.
//
// One binary, one subcommand per process, so that a test can restart the API server alone while etcd keeps the
// data and the controllers reconnect:
//
//	cluster pki         --dir D --apiserver-port P   CA, serving and admin certificates, SA keys, kubeconfig
//	cluster etcd        --dir D --client-port P       embedded etcd, data in D/etcd
//	cluster apiserver   --dir D --port P --etcd URL   kube-apiserver on 127.0.0.1:P, TLS from D
//	cluster controllers --dir D                       the controllers, through D/admin.kubeconfig
//	cluster compact     --etcd URL                    compact etcd at its current revision
//
// tests/helpers/cluster.py starts and stops the processes; it is the only caller. Only the test fixture is
// Go: the product is Python.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: cluster pki|etcd|apiserver|controllers|compact [flags]")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	var err error
	switch cmd, args := os.Args[1], os.Args[2:]; cmd {
	case "pki":
		err = runPKI(args)
	case "etcd":
		err = runEtcd(ctx, args)
	case "apiserver":
		err = runAPIServer(args)
	case "controllers":
		err = runControllers(ctx, args)
	case "compact":
		err = runCompact(ctx, args)
	default:
		err = fmt.Errorf("unknown subcommand %q", cmd)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "cluster %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}
