"""ManifestDirectory: parsing a directory of YAML/JSON manifests and reporting differences per rescan.

Also the hostile files (each a located error of its file, the last good version kept, the source still
following), the cost budgets and the entries that are not regular files. Random and mutated files are in
test_manifest_fuzz.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from balancing.errors import ManifestError, ObjectError
from balancing.model.objects import KubeObject, Service, ref
from balancing.sources import decoding, files, manifests
from balancing.sources.manifests import ManifestDirectory, is_manifest_name, parse_manifest
from balancing.sources.update import SourceUpdate


def located(errors: Sequence[ObjectError]) -> list[ManifestError]:
    """A manifest source's errors, each a ``ManifestError`` (file and document)."""
    assert all(isinstance(e, ManifestError) for e in errors)
    return [e for e in errors if isinstance(e, ManifestError)]


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
    (error,) = located(update.errors)
    assert isinstance(error, ManifestError)
    assert (error.file, error.document, error.obj) == (path, 2, "Service default/web")
    assert error.field == "spec.ports[0].port" and "65535" in error.message
    assert str(error).startswith(f"{path} document 2 (Service default/web): spec.ports[0].port: ")
    assert "ignored until fixed" in str(error)
    assert d.errors() == update.errors


def test_union_field_errors_are_one_per_field(tmp_path: Path, d: ManifestDirectory) -> None:
    (tmp_path / "a.yaml").write_text(service("web") + "  externalIPs: [nope]\n")
    (error,) = d.load().errors  # one error, whatever the alternatives of the union said
    assert error.field == "spec.externalIPs[0]"


def test_bad_yaml_keeps_last_good_version(tmp_path: Path, d: ManifestDirectory) -> None:
    path = tmp_path / "web.yaml"
    path.write_text(service("web") + "---\n" + service("api"))
    d.load()
    path.write_text(service("web", port=81) + "---\nkind: [unclosed\n")
    update = d.rescan()
    assert update.upserts == [] and update.deletes == []
    (error,) = located(update.errors)
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
    assert [e.field for e in located(update.errors)] == ["spec.ports[0].port"]
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
    (error,) = located(update.errors)
    assert "invalid JSON at line 1" in error.message
    path.write_text(json.dumps(yaml.safe_load(service("web"))))
    assert refs(d.rescan().upserts) == [("Service", "default", "web")]
    assert d.errors() == []


def test_unchanged_bad_file_not_reported_again(tmp_path: Path, d: ManifestDirectory) -> None:
    (tmp_path / "a.yaml").write_text("kind: Service\n")
    assert len(d.load().errors) == 1
    assert not d.rescan()
    assert len(d.errors()) == 1


def test_missing_kind_and_non_mapping_documents(tmp_path: Path, d: ManifestDirectory) -> None:
    (tmp_path / "a.yaml").write_text("metadata: {name: x}\n---\n- 1\n- 2\n")
    errors = located(d.load().errors)
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


# --- hostile files: every one is the file's located error, never an exception ---------------------------

BOMB = "\n".join(
    [f"a0: &a0 [{', '.join(['lol'] * 9)}]"]
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
)
GOOD_JSON = json.dumps(yaml.safe_load(service("web")))
PORTS_DUP_JSON = GOOD_JSON.replace('"port": 80', '"port": 80, "port": 81')
HOSTILE: dict[str, tuple[str, str | bytes, str, str]] = {  # case: (file, content, in the message, field)
    "flow nesting": ("x.yaml", "[" * 3000, "exceeded maximum nesting depth", ""),  # libyaml's own limit
    "block nesting": (
        "x.yaml",
        "- " * 3000 + "x",
        "over the nesting depth budget (100 levels) at line 1",
        "",
    ),
    "5000-digit int": (
        "x.yaml",
        service("web").replace("port: 80", "port: " + "7" * 5000),
        "invalid YAML at line 8 column 11: integer of 5000 digits",
        "",
    ),
    "5000-digit int in JSON": ("x.json", GOOD_JSON.replace("80", "9" * 5000), "integer of 5000 digits", ""),
    "deep JSON": ("x.json", "[" * 3000 + "]" * 3000, "over the nesting depth budget", ""),
    "unclosed deep JSON": ("x.json", "[" * 3000, "over the nesting depth budget", ""),
    "duplicate key": ("x.yaml", service("web") + "    port: 81\n", 'mapping key "port" already defined', ""),
    "duplicate key in JSON": ("x.json", PORTS_DUP_JSON, 'mapping key "port" already', "spec.ports[0].port"),
    "alias bomb": ("x.yaml", BOMB, "over the alias expansion budget (400000 nodes)", ""),
    "alias in its anchor": ("x.yaml", "a: &a [1, *a]\n", "alias refers to a node that contains it", ""),
    "control character": ("x.yaml", "a: \x01\n", "invalid YAML at line 1 column 4: unacceptable", ""),
    "not UTF-8": ("x.yaml", b"a: \xff\xfe\n", "not UTF-8", ""),
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_content_is_the_files_error(tmp_path: Path, d: ManifestDirectory, case: str) -> None:
    name, content, expected, field = HOSTILE[case]
    path = tmp_path / name
    path.write_text(GOOD_JSON if name.endswith(".json") else service("web"))
    d.load()
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    update = d.rescan()
    (error,) = located(update.errors)
    assert (error.file, error.field) == (path, field) and error.document in (0, 1)
    assert expected in error.message and "keeping the last good version" in error.message, error.message
    assert port_of(d.objects(), "web") == 80 and not update.upserts and not update.deletes

    (tmp_path / "later.yaml").write_text(service("later"))  # the source still follows
    assert refs(d.rescan().upserts) == [("Service", "default", "later")]

    restarted = ManifestDirectory(tmp_path).load()  # and a restart still starts
    assert refs(restarted.upserts) == [("Service", "default", "later")]
    assert [e.file for e in located(restarted.errors)] == [path]


def test_duplicate_key_names_both_lines(tmp_path: Path, d: ManifestDirectory) -> None:
    (tmp_path / "a.yaml").write_text(
        service("api") + "---\n" + service("web").replace("  name: web\n", "  name: web\n  name: w2\n")
    )
    (error,) = located(d.load().errors)
    assert error.document == 2
    assert error.message.startswith(
        'invalid YAML at line 14 column 3: mapping key "name" already defined at line 13'
    )


def test_merge_keys_may_be_overridden_but_not_repeated(tmp_path: Path, d: ManifestDirectory) -> None:
    base = "x-ports: &p {port: 80, protocol: TCP}\n"
    text = service("web").replace("  - port: 80", "  - {<<: *p, port: 81}")
    (tmp_path / "a.yaml").write_text(text.replace("spec:", base + "spec:"))
    update = d.load()
    assert [str(e) for e in located(update.errors)] == [] and port_of(update.upserts, "web") == 81
    (tmp_path / "a.yaml").write_text(
        text.replace("port: 81}", "port: 81, port: 82}").replace("spec:", base + "spec:")
    )
    (error,) = d.rescan().errors
    assert 'mapping key "port" already defined' in error.message


def test_yaml_goes_through_libyaml_when_present() -> None:
    assert yaml.__with_libyaml__, "PyYAML without libyaml: the pure parser is much slower"
    assert issubclass(decoding._Loader, yaml._yaml.CParser)


def test_pure_parser_fallback_has_the_same_rules(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(decoding, "_Loader", decoding._PureLoader)
    cases = {
        "dup.yaml": (service("web") + "    port: 81\n", 'mapping key "port" already defined at line 8'),
        "deep.yaml": ("- " * 3000 + "x", "over the nesting depth budget"),
        "bomb.yaml": (BOMB, "over the alias expansion budget"),
        "bad.yaml": ("a: 1\n  b: 2\n", "invalid YAML at line 2 column 4: mapping values are not allowed"),
        "int.yaml": ("a: " + "1" * 5000, "invalid YAML at line 1 column 4: integer of 5000 digits"),
        "ctrl.yaml": ("a: \x01\n", "invalid YAML at line 1 column 4: unacceptable character #x0001: special"),
    }
    for name, (text, expected) in cases.items():
        (tmp_path / name).write_text(text)
        _, errors = parse_manifest(tmp_path / name, (tmp_path / name).read_bytes())
        assert [e.message for e in errors if expected not in e.message] == [], name
        assert errors, name
    assert decoding.decode("t.yaml", b"a: 2024-01-02T03:04:05Z\n") == [{"a": "2024-01-02T03:04:05Z"}]


def test_parse_never_raises_for_what_validation_raises(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    class PanicException(BaseException):  # as pydantic-core's pyo3 panics: not an Exception
        pass

    for exc in (RecursionError("deep"), MemoryError(), SystemError("bad"), PanicException("panic")):

        def explode(doc: Any, exc: BaseException = exc) -> KubeObject:
            raise exc

        monkeypatch.setattr(manifests, "parse_object", explode)
        objects, errors = parse_manifest(tmp_path / "a.yaml", service("web").encode())
        assert objects == [] and len(errors) == 1
        assert (errors[0].document, errors[0].obj) == (1, "Service default/web")
        assert type(exc).__name__ in errors[0].message

    def interrupt(doc: Any) -> KubeObject:
        raise KeyboardInterrupt

    monkeypatch.setattr(manifests, "parse_object", interrupt)
    with pytest.raises(KeyboardInterrupt):
        parse_manifest(tmp_path / "a.yaml", service("web").encode())


def test_odd_values_in_naming_fields_are_errors_not_crashes(tmp_path: Path, d: ManifestDirectory) -> None:
    (tmp_path / "a.json").write_text('{"apiVersion": "v1", "kind": ' + "1" * 4000 + ', "items": 5}')
    (tmp_path / "b.yaml").write_text("kind: [List]\nitems: 3\n---\nkind: ServiceList\nitems: 3\n---\n[]\n")
    update = d.load()
    assert update.upserts == []  # a.json: a kind not read (named as far as it fits in a message)
    assert [(e.file.name, e.document, e.field) for e in located(update.errors)] == [
        ("b.yaml", 1, "apiVersion"),
        ("b.yaml", 2, "items"),
        ("b.yaml", 3, ""),
    ]


# --- budgets ----------------------------------------------------------------------------------------------


def test_file_size_budget_is_checked_before_reading(tmp_path: Path, d: ManifestDirectory) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(service("web"))
    d.load()
    with path.open("r+b") as f:
        f.truncate(decoding.MAX_FILE_BYTES + 1)  # sparse: nothing to read, and it must not be read
    (error,) = d.rescan().errors
    assert error.message.startswith(f"over the file size budget ({decoding.MAX_FILE_BYTES} bytes)")
    assert port_of(d.objects(), "web") == 80
    assert not d.rescan()  # the same problem is not reported again


def test_file_growing_past_the_budget_while_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.yaml"
    path.write_bytes(b"x" * 10)
    real_fstat = os.fstat
    monkeypatch.setattr(os, "fstat", lambda fd: os.stat_result((*real_fstat(fd)[:6], 2, *real_fstat(fd)[7:])))
    with pytest.raises(files.TooLarge):
        files.read_regular(path, 5)


def test_objects_budget(tmp_path: Path) -> None:
    d = ManifestDirectory(tmp_path, decoding.Budgets(objects=3))
    (tmp_path / "few.yaml").write_text("---\n".join(service(n) for n in "abc"))
    (tmp_path / "docs.yaml").write_text("---\n" * 10)
    items = [yaml.safe_load(service(n)) for n in "defg"]
    (tmp_path / "list.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    update = d.load()
    assert len(update.upserts) == 3
    budget = "over the objects per file budget (3 objects)"
    assert [e.file.name for e in located(update.errors) if e.message.startswith(budget)] == [
        "docs.yaml",
        "list.json",
    ]
    assert "the file holds 4" in update.errors[1].message


def test_alias_budget_allows_modest_reuse(tmp_path: Path, d: ManifestDirectory) -> None:
    ports = "x-ports: &ports [{name: http, port: 80}, {name: https, port: 443}]\n"
    docs = [service(f"s{i}").replace("  ports:\n  - port: 80\n", "  ports: *ports\n") for i in range(200)]
    (tmp_path / "a.yaml").write_text("---\n".join(d.replace("spec:", ports + "spec:") for d in docs))
    update = d.load()
    assert update.errors == [] and len(update.upserts) == 200


def test_alias_bomb_is_cheap(tmp_path: Path, d: ManifestDirectory) -> None:
    (tmp_path / "a.yaml").write_text(BOMB + "\n")
    started = time.perf_counter()
    (error,) = located(d.load().errors)
    assert time.perf_counter() - started < 0.5
    assert "alias expansion" in error.message


def bomb(entry: str, sep: str) -> str:
    """Nine levels of nine aliases, each anchor written as ``entry`` formats it."""
    names = ["l"] + [f"n{i}" for i in range(9)]
    values = ['["x","x"]'] + [f"[{','.join([f'*{names[i]}'] * 9)}]" for i in range(9)]
    return sep.join(entry.format(name=n, value=v) for n, v in zip(names, values, strict=True))


@pytest.mark.parametrize(
    "text",
    [
        bomb("{name}: &{name} {value}", "\n"),
        bomb("{name}:\t&{name} {value}", "\n"),
        "{" + bomb('"{name}":&{name} {value}', ",") + "}",
        "[" + bomb("&{name} {value}", ",") + "]",
        "- " + bomb("? &{name} {value}", "\n  ") + "\n",
    ],
    ids=["block", "tab", "JSON-like", "flow sequence", "complex key"],
)
def test_alias_budget_sees_every_place_an_anchor_can_start(text: str) -> None:
    with pytest.raises(decoding.DecodeError, match="over the alias expansion budget"):
        decoding.decode("a.yaml", text.encode())
    assert decoding._ANCHOR.search("\ufeff&a x") and decoding._ANCHOR.search("[1,&a 2]")


def test_ampersands_in_text_are_just_text() -> None:
    text = "a: http://x/?a=1&b=2\nb: 'x &y'\nc: R&D\n"
    assert decoding.decode("a.yaml", text.encode()) == [{"a": "http://x/?a=1&b=2", "b": "x &y", "c": "R&D"}]


def test_depth_budget_counts_aliases_expanded(tmp_path: Path) -> None:
    d = ManifestDirectory(tmp_path, decoding.Budgets(depth=8))
    (tmp_path / "a.yaml").write_text("a: &a [[[[1]]]]\nb: [[[*a]]]\n")
    (error,) = located(d.load().errors)
    assert "over the nesting depth budget (8 levels)" in error.message and "aliases expanded" in error.message


def test_many_errors_are_summed_up(tmp_path: Path, d: ManifestDirectory) -> None:
    items = [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"s{i}"}} for i in range(150)]
    (tmp_path / "a.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    errors = located(d.load().errors)
    assert len(errors) == manifests.MAX_REPORTED_ERRORS + 1
    assert errors[-1].message.startswith("50 more problems")


# --- special files ------------------------------------------------------------------------------------------


def test_special_entries_are_skipped_with_one_warning(
    tmp_path: Path, d: ManifestDirectory, caplog: pytest.LogCaptureFixture
) -> None:
    os.mkfifo(tmp_path / "fifo.yaml")
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "dangling.yaml").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop.yaml").symlink_to(tmp_path / "loop.yaml")
    (tmp_path / "device.yaml").symlink_to("/dev/null")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "s.yaml"))
    (tmp_path / "web.yaml").write_text(service("web"))
    with caplog.at_level(logging.WARNING), _not_blocking():
        update = d.load()
        assert not d.rescan() and not d.rescan({tmp_path / "fifo.yaml"})
    sock.close()
    assert refs(update.upserts) == [("Service", "default", "web")] and update.errors == []
    warned = sorted(r.getMessage().split(": skipping ")[1] for r in caplog.records)
    assert warned == [
        "dangling.yaml (a dangling symlink, not a regular file)",
        "device.yaml (a character device, not a regular file)",
        "dir.yaml (a directory, not a regular file)",
        "fifo.yaml (a FIFO, not a regular file)",
        "loop.yaml (a symlink loop, not a regular file)",
        "s.yaml (a socket, not a regular file)",
    ]


def test_file_replaced_by_a_fifo_is_skipped_and_its_objects_removed(
    tmp_path: Path, d: ManifestDirectory
) -> None:
    (tmp_path / "web.yaml").write_text(service("web"))
    d.load()
    (tmp_path / "web.yaml").unlink()
    os.mkfifo(tmp_path / "web.yaml")
    with _not_blocking():
        assert d.rescan().deletes == [("Service", "default", "web")]


def test_fifo_swapped_in_after_the_stat_is_never_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fifo = tmp_path / "a.yaml"
    os.mkfifo(fifo)
    regular = os.stat(__file__)
    monkeypatch.setattr(os, "stat", lambda path, **kw: regular)  # as if a regular file was there at stat time
    with _not_blocking(), pytest.raises(files.NotRegular, match="FIFO"):
        files.read_regular(fifo, 1 << 20)


@contextlib.contextmanager
def _not_blocking() -> Iterator[None]:
    """Fail (instead of hanging the suite) if the body blocks, e.g. on opening a FIFO for reading."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError("blocked")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, 5)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_no_name_in_a_file_can_forge_a_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Control characters in a kind, a name or a file name are escaped in every message."""
    forged = "x\nERROR balancing.agent: forged"
    (tmp_path / "a.yaml").write_text(
        f"apiVersion: v1\nkind: {json.dumps('Secretz' + forged)}\nmetadata: {{name: a}}\n---\n"
        f"apiVersion: v1\nkind: Service\nmetadata: {{name: {json.dumps('web' + forged)}}}\n"
        "spec: {ports: [{port: 80}]}\n"
    )
    with caplog.at_level(logging.WARNING):
        update = ManifestDirectory(tmp_path).load()
    assert update.errors and all("\n" not in str(e) for e in update.errors)
    assert caplog.records and all("\n" not in r.getMessage() for r in caplog.records)
