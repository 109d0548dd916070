"""ManifestDirectory: parsing a directory of YAML/JSON manifests and reporting differences per rescan."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from balancing.errors import ManifestError
from balancing.model.objects import KubeObject, Service, ref
from balancing.sources.manifests import ManifestDirectory, SourceUpdate, is_manifest_name


def service(name: str, port: int = 80, namespace: str | None = None) -> str:
    ns = f"\n  namespace: {namespace}" if namespace else ""
    return f"""apiVersion: v1
kind: Service
metadata:
  name: {name}{ns}
spec:
  clusterIP: 10.0.0.1
  ports:
  - port: {port}
"""


def slice_doc(name: str, ip: str = "10.1.0.1") -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}],
        "ports": [{"port": 8080}],
    }


def refs(objects: list[KubeObject]) -> list[tuple[str, str, str]]:
    return sorted(ref(obj) for obj in objects)


def port_of(objects: list[KubeObject], name: str) -> int:
    (svc,) = [o for o in objects if isinstance(o, Service) and o.metadata.name == name]
    return int(svc.spec.ports[0].port)


@pytest.fixture
def d(tmp_path: Path) -> ManifestDirectory:
    return ManifestDirectory(tmp_path)


# --- reading ---------------------------------------------------------------------------------------------


def test_multi_document_yaml(tmp_path: Path, d: ManifestDirectory) -> None:
    (tmp_path / "web.yaml").write_text(service("web") + "---\n" + service("api", namespace="prod") + "---\n")
    update = d.load()
    assert refs(update.upserts) == [("Service", "default", "web"), ("Service", "prod", "api")]
    assert update.deletes == [] and update.errors == []


def test_json_and_yml_and_list_kinds(tmp_path: Path, d: ManifestDirectory) -> None:
    (tmp_path / "one.json").write_text(json.dumps(slice_doc("s1")))
    (tmp_path / "list.json").write_text(
        json.dumps({"apiVersion": "v1", "kind": "List", "items": [slice_doc("s2")]})
    )
    item = slice_doc("s3")
    del item["kind"], item["apiVersion"]  # as the API serves typed lists
    typed = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList", "items": [item]}
    (tmp_path / "typed.json").write_text(json.dumps(typed))
    (tmp_path / "list.yml").write_text(
        "apiVersion: v1\nkind: List\nitems:\n- " + service("web").replace("\n", "\n  ").rstrip() + "\n"
    )
    update = d.load()
    assert update.errors == []
    assert refs(update.upserts) == [
        ("EndpointSlice", "default", "s1"),
        ("EndpointSlice", "default", "s2"),
        ("EndpointSlice", "default", "s3"),
        ("Service", "default", "web"),
    ]


def test_only_manifest_files_directly_in_directory(tmp_path: Path, d: ManifestDirectory) -> None:
    for name in ["a.yaml~", ".#a.yaml", ".a.yaml", ".a.yaml.swp", "a.txt", "README"]:
        (tmp_path / name).write_text("not: [valid")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text(service("b"))
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "a.yaml").write_text(service("a"))
    update = d.load()
    assert refs(update.upserts) == [("Service", "default", "a")]
    assert update.errors == []
    assert is_manifest_name("x.YML") and not is_manifest_name("x.yaml~")


def test_unknown_kinds_skipped_with_warning(
    tmp_path: Path, d: ManifestDirectory, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "mixed.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\n---\n" + service("web")
    )
    with caplog.at_level(logging.WARNING):
        update = d.load()
    assert refs(update.upserts) == [("Service", "default", "web")]
    assert update.errors == []
    assert "mixed.yaml document 1" in caplog.text and "v1 ConfigMap" in caplog.text


def test_namespace_defaulting(tmp_path: Path, d: ManifestDirectory) -> None:
    node = "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\n"
    (tmp_path / "a.yaml").write_text(service("web") + "---\n" + node)
    (tmp_path / "b.json").write_text(json.dumps(slice_doc("s")))
    objects = d.load().upserts
    assert refs(objects) == [
        ("EndpointSlice", "default", "s"),
        ("Node", "", "n1"),
        ("Service", "default", "web"),
    ]
    assert {o.metadata.namespace for o in objects if o.kind != "Node"} == {"default"}


def test_timestamps_stay_text(tmp_path: Path, d: ManifestDirectory) -> None:
    text = service("web").replace("  name: web", "  name: web\n  creationTimestamp: 2024-01-02T03:04:05Z")
    (tmp_path / "a.yaml").write_text(text)
    (obj,) = d.load().upserts
    assert obj.metadata.creation_timestamp == "2024-01-02T03:04:05Z"


# --- errors ----------------------------------------------------------------------------------------------


def test_validation_error_names_file_document_object_field(tmp_path: Path, d: ManifestDirectory) -> None:
    path = tmp_path / "web.yaml"
    path.write_text(service("api") + "---\n" + service("web", port=70000))
    update = d.load()
    assert update.upserts == []  # whole file: nothing of a never-good file
    (error,) = update.errors
    assert isinstance(error, ManifestError)
    assert (error.file, error.document, error.obj) == (path, 2, "Service default/web")
    assert error.field == "spec.ports[0].port"
    expected = "spec.ports[0].port: Input should be less than or equal to 65535"
    assert str(error).startswith(f"{path} document 2 (Service default/web): {expected}")
    assert "ignored until fixed" in str(error)
    assert d.errors() == update.errors


def test_union_field_errors_are_one_per_field(tmp_path: Path, d: ManifestDirectory) -> None:
    (tmp_path / "a.yaml").write_text(service("web") + "  externalIPs: [nope]\n")
    (error,) = d.load().errors
    assert error.field == "spec.externalIPs[0]"
    assert "IPv4" in error.message and "IPv6" in error.message


def test_bad_yaml_keeps_last_good_version(tmp_path: Path, d: ManifestDirectory) -> None:
    path = tmp_path / "web.yaml"
    path.write_text(service("web") + "---\n" + service("api"))
    d.load()
    path.write_text(service("web", port=81) + "---\nkind: [unclosed\n")
    update = d.rescan()
    assert update.upserts == [] and update.deletes == []
    (error,) = update.errors
    assert error.document == 2 and error.file == path
    assert "invalid YAML at line" in error.message and "last good version" in error.message
    assert port_of(d.objects(), "web") == 80


def test_validation_error_keeps_last_good_version_then_fix(tmp_path: Path, d: ManifestDirectory) -> None:
    path = tmp_path / "web.yaml"
    path.write_text(service("web"))
    d.load()
    path.write_text(service("web", port=0))
    update = d.rescan({path})
    assert not update.upserts and not update.deletes
    assert [e.field for e in update.errors] == ["spec.ports[0].port"]
    assert "keeping the last good version" in str(update.errors[0])
    assert port_of(d.objects(), "web") == 80

    path.write_text(service("web", port=8080))
    update = d.rescan({path})
    assert port_of(update.upserts, "web") == 8080
    assert update.errors == [] and d.errors() == []


def test_bad_first_version_contributes_nothing_until_fixed(tmp_path: Path, d: ManifestDirectory) -> None:
    path = tmp_path / "web.json"
    path.write_text('{"apiVersion": "v1", "kind": "Service",')
    update = d.load()
    assert update.upserts == []
    (error,) = update.errors
    assert "invalid JSON at line 1" in error.message
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}}))
    assert refs(d.rescan().upserts) == [("Service", "default", "web")]
    assert d.errors() == []


def test_unchanged_bad_file_not_reported_again(tmp_path: Path, d: ManifestDirectory) -> None:
    (tmp_path / "a.yaml").write_text("kind: Service\n")
    assert len(d.load().errors) == 1
    assert not d.rescan()
    assert len(d.errors()) == 1


def test_missing_kind_and_non_mapping_documents(tmp_path: Path, d: ManifestDirectory) -> None:
    (tmp_path / "a.yaml").write_text("metadata: {name: x}\n---\n- 1\n- 2\n")
    errors = d.load().errors
    assert [(e.document, e.field) for e in errors] == [(1, "apiVersion"), (2, "")]


# --- differences -----------------------------------------------------------------------------------------


def test_rescan_returns_only_differences(tmp_path: Path, d: ManifestDirectory) -> None:
    (tmp_path / "a.yaml").write_text(service("a") + "---\n" + service("b"))
    (tmp_path / "c.yaml").write_text(service("c"))
    assert len(d.load().upserts) == 3
    assert d.rescan() == SourceUpdate()
    assert not d.rescan()

    (tmp_path / "a.yaml").write_text(service("a") + "---\n" + service("b", port=81) + "\n# comment\n")
    update = d.rescan()
    assert refs(update.upserts) == [("Service", "default", "b")] and update.deletes == []

    (tmp_path / "a.yaml").write_text(
        service("a") + "\n# only a comment changed\n---\n" + service("b", port=81)
    )
    assert not d.rescan()


def test_file_removal_deletes_its_objects(tmp_path: Path, d: ManifestDirectory) -> None:
    (tmp_path / "a.yaml").write_text(service("a") + "---\n" + service("b"))
    (tmp_path / "c.yaml").write_text(service("c"))
    d.load()
    (tmp_path / "a.yaml").unlink()
    update = d.rescan({tmp_path / "a.yaml"})
    assert update.upserts == []
    assert update.deletes == [("Service", "default", "a"), ("Service", "default", "b")]
    assert refs(d.objects()) == [("Service", "default", "c")]


def test_removing_bad_file_clears_its_errors(tmp_path: Path, d: ManifestDirectory) -> None:
    (tmp_path / "a.yaml").write_text("{")
    d.load()
    assert len(d.errors()) == 1
    (tmp_path / "a.yaml").unlink()
    assert not d.rescan()
    assert d.errors() == []


def test_object_moves_between_files_without_churn(tmp_path: Path, d: ManifestDirectory) -> None:
    (tmp_path / "a.yaml").write_text(service("web"))
    d.load()
    (tmp_path / "b.yaml").write_text(service("web"))
    (tmp_path / "a.yaml").unlink()
    assert not d.rescan()


def test_duplicate_across_files_first_name_wins(
    tmp_path: Path, d: ManifestDirectory, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "b.yaml").write_text(service("web", port=2))
    (tmp_path / "a.yaml").write_text(service("web", port=1))
    with caplog.at_level(logging.WARNING):
        update = d.load()
    assert port_of(update.upserts, "web") == 1
    assert "a.yaml" in caplog.text and "b.yaml" in caplog.text and "default/web" in caplog.text

    (tmp_path / "a.yaml").unlink()  # the other definition takes over
    update = d.rescan()
    assert port_of(update.upserts, "web") == 2 and update.deletes == []


def test_missing_directory_keeps_objects(tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    (root / "a.yaml").write_text(service("a"))
    d = ManifestDirectory(root)
    d.load()
    (root / "a.yaml").unlink()
    root.rmdir()
    assert not d.rescan()
    assert not d.rescan({root / "a.yaml"})
    assert refs(d.objects()) == [("Service", "default", "a")]
    root.mkdir()
    assert d.rescan().deletes == [("Service", "default", "a")]


def test_load_again_is_a_full_resync(tmp_path: Path, d: ManifestDirectory) -> None:
    (tmp_path / "a.yaml").write_text(service("a"))
    (tmp_path / "b.yaml").write_text("{")
    d.load()
    (tmp_path / "c.yaml").write_text(service("c"))
    update = d.load()
    assert refs(update.upserts) == [("Service", "default", "a"), ("Service", "default", "c")]
    assert len(update.errors) == 1
