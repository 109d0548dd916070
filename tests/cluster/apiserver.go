package main

// The real kube-apiserver (k8s.io/kubernetes/cmd/kube-apiserver/app), with the flags a small dual-stack test
// cluster needs; extra flags after "--" are passed on. Admission webhooks are on (they are in the default plugin
// set); authorization is RBAC, so the chart's Roles are what the agent and the controller get.

import (
	"flag"
	"fmt"
	"path/filepath"

	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func runAPIServer(args []string) error {
	fs := flag.NewFlagSet("apiserver", flag.ContinueOnError)
	dir := fs.String("dir", "", "the pki directory")
	port := fs.Int("port", 0, "secure port on 127.0.0.1")
	etcd := fs.String("etcd", "", "etcd client URL")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dir == "" || *port == 0 || *etcd == "" {
		return fmt.Errorf("--dir, --port and --etcd are required")
	}
	p := func(name string) string { return filepath.Join(*dir, name) }
	flags := []string{
		"--bind-address=127.0.0.1",
		fmt.Sprintf("--secure-port=%d", *port),
		"--advertise-address=10.0.0.1",
		"--endpoint-reconciler-type=none",
		"--etcd-servers=" + *etcd,
		"--tls-cert-file=" + p("apiserver.crt"),
		"--tls-private-key-file=" + p("apiserver.key"),
		"--client-ca-file=" + p("ca.crt"),
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + p("sa.pub"),
		"--service-account-signing-key-file=" + p("sa.key"),
		"--authorization-mode=RBAC",
		"--service-cluster-ip-range=10.96.0.0/16,fd00:96::/112",
		"--allow-privileged=true",
		"--profiling=false",
		"--enable-priority-and-fairness=false",
		"--cert-dir=" + p("apiserver-certs"),
		// a restart closes the open watches after 2 s instead of waiting for them to end on their own
		"--shutdown-watch-termination-grace-period=2s",
	}
	flags = append(flags, fs.Args()...)
	cmd := app.NewAPIServerCommand()
	cmd.SetArgs(flags)
	return cmd.Execute()
}
