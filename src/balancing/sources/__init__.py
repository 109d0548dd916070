"""Sources: where Kubernetes objects come from, delivered as ``SourceUpdate``\\ s (upserts, deletes, errors).

A source only reads its input and validates it into ``balancing.model`` object types; it may import the
standard library, pydantic, PyYAML, watchfiles, httpx, ``balancing.model`` and ``balancing.errors``, never the
datapath, events, agent or CLI (import-linter enforces this). The agent applies the updates to the model's
store.

Modules: ``update`` (``SourceUpdate``, what every source delivers). The manifest directory: ``manifests``
reads a directory of YAML/JSON manifests, ``watch`` follows it as files change, ``files`` reads one file
without blocking and within a size budget, ``decoding`` turns its bytes into documents strictly and within
cost budgets. The API server: ``kube`` follows it by list+watch (``KubeSource``), ``kubeconfig`` reads
kubeconfig files (contexts, ``KUBECONFIG`` merged as kubectl merges it) into where the server is and how to
trust it, ``kubecredentials`` is how to authenticate (tokens, token files re-read as they rotate, exec
credential plugins, a retry after a 401), ``informer`` follows one resource, ``selected_pods`` decides which
Pods beyond this node's to follow, ``boundedjson`` parses its JSON within a nesting bound, and
``kubestatus`` is the one write path back to it (patches of the policies' status subresource, nothing
else).
"""
