package main

// The controllers Services need, as kube-controller-manager would run them: EndpointSlice (slices from
// Services and Pods), EndpointSliceMirroring (slices from selector-less Endpoints), namespace (deletes a
// namespace's contents), service account (the "default" account pods need) and service-account token (legacy
// token Secrets). They are built directly from their packages, as Kubernetes' integration tests do, rather
// than through the controller-manager command, whose process-wide registries would clash with nothing here but
// which would also start controllers the tests do not want.

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/client-go/informers"
	clientset "k8s.io/client-go/kubernetes"
	"k8s.io/client-go/metadata"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/util/keyutil"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/pkg/controller/endpointslice"
	"k8s.io/kubernetes/pkg/controller/endpointslicemirroring"
	"k8s.io/kubernetes/pkg/controller/namespace"
	"k8s.io/kubernetes/pkg/controller/serviceaccount"
	sa "k8s.io/kubernetes/pkg/serviceaccount"
)

func runControllers(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("controllers", flag.ContinueOnError)
	dir := fs.String("dir", "", "the pki directory (admin.kubeconfig, sa.key, ca.crt)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", filepath.Join(*dir, "admin.kubeconfig"))
	if err != nil {
		return err
	}
	cfg.QPS, cfg.Burst = 200, 400
	client, err := clientset.NewForConfig(cfg)
	if err != nil {
		return err
	}
	meta, err := metadata.NewForConfig(cfg)
	if err != nil {
		return err
	}
	keys, err := keyutil.PrivateKeyFromFile(filepath.Join(*dir, "sa.key"))
	if err != nil {
		return err
	}
	rootCA, err := os.ReadFile(filepath.Join(*dir, "ca.crt"))
	if err != nil {
		return err
	}
	logger := klog.FromContext(ctx)
	factory := informers.NewSharedInformerFactory(client, 0)
	core := factory.Core().V1()

	slices := endpointslice.NewController(ctx, core.Pods(), core.Services(), core.Nodes(),
		factory.Discovery().V1().EndpointSlices(), 100, client, 0)
	mirroring := endpointslicemirroring.NewController(ctx, core.Endpoints(),
		factory.Discovery().V1().EndpointSlices(), core.Services(), 1000, client, 0)
	namespaces := namespace.NewNamespaceController(ctx, client, meta,
		client.Discovery().ServerPreferredNamespacedResources, core.Namespaces(), 5*time.Minute, v1.FinalizerKubernetes)
	accounts, err := serviceaccount.NewServiceAccountsController(logger, core.ServiceAccounts(), core.Namespaces(),
		client, serviceaccount.DefaultServiceAccountsControllerOptions())
	if err != nil {
		return err
	}
	generator, err := sa.JWTTokenGenerator(sa.LegacyIssuer, keys)
	if err != nil {
		return err
	}
	tokens, err := serviceaccount.NewTokensController(logger, core.ServiceAccounts(), core.Secrets(), client,
		serviceaccount.TokensControllerOptions{TokenGenerator: generator, RootCA: rootCA})
	if err != nil {
		return err
	}
	factory.Start(ctx.Done())
	go slices.Run(ctx, 5)
	go mirroring.Run(ctx, 5)
	go namespaces.Run(ctx, 5)
	go accounts.Run(ctx, 2)
	go tokens.Run(ctx, 2)
	fmt.Println("controllers running")
	<-ctx.Done()
	factory.Shutdown()
	return nil
}
