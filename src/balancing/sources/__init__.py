"""Sources: where Kubernetes objects come from, delivered as ``SourceUpdate``\\ s (upserts, deletes, errors).

``manifests`` reads a directory of YAML/JSON manifests, ``watch`` follows it as files change. A source only
reads its input and validates it into ``balancing.model`` object types; it may import the standard library,
pydantic, PyYAML, watchfiles, ``balancing.model`` and ``balancing.errors``, never the datapath, events, agent
or CLI (import-linter enforces this). The agent applies the updates to the model's store. ``kube`` and
``informer`` follow the API server; ``kubestatus`` is the one write path back to it (patches of the
policies' status subresource, nothing else).
"""
