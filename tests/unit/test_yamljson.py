"""native/yamljson.c through noded/sources/yamlfast.py: every stream it takes reads exactly as PyYAML's SafeLoader
reads it (types included: True is not 1), and every stream it declines or cannot parse is PyYAML's."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from noded.sources import yamlfast
from noded.sources.directory import parse_manifests

pytestmark = pytest.mark.skipif(not yamlfast.available(), reason="`make bpf` builds native/yamljson.c")

LOADER = yaml.CSafeLoader


def same(a, b) -> bool:
    """Equal with the same types all the way down (1 == True and 0.0 == -0.0 for ==, not here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    return a == b


def pyyaml(text: str):
    try:
        return list(yaml.load_all(text, Loader=LOADER))
    except yaml.YAMLError:
        return "error"


def check(text: str) -> bool:
    """The fast reading, when there is one, is PyYAML's; whether there was one."""
    converted = yamlfast.to_json(text)
    if converted is None:
        return False
    expected = pyyaml(text)
    assert expected != "error", f"took what PyYAML refuses: {text!r}"
    assert same(json.loads(converted), expected), f"{text!r}: {converted} against {expected!r}"
    return True


# the pieces plain scalars that look like numbers, booleans, nulls and timestamps are made of
TOKENS = [
    "0",
    "1",
    "7",
    "8",
    "9",
    "00",
    "12",
    "_",
    ".",
    ":",
    "-",
    "+",
    "e",
    "E",
    "x",
    "b",
    "o",
    "inf",
    "nan",
    "NaN",
    "INF",
    "yes",
    "No",
    "ON",
    "off",
    "true",
    "False",
    "null",
    "~",
    "<<",
    "=",
    "T",
    "Z",
    " ",
    "a",
]


def test_plain_scalars_resolve_as_pyyaml_resolves_them():
    corpus = {"".join(p) for n in (1, 2, 3) for p in itertools.product(TOKENS, repeat=n)}
    corpus |= {
        "10.96.0.1",
        "2001:db8::1",
        "fd00::1",
        "1:20",
        "190:20:30",
        "190:20:30.15",
        "1:60",
        "1:5:9.",
        "-1.5e+3",
        "1.e+3",
        "1.e5",
        ".5",
        "-.5",
        "+.5",
        "+.inf",
        "-.inf",
        ".NaN",
        "0b101",
        "0x1F",
        "0o17",
        "0755",
        "08",
        "0.5",
        "00.5",
        "-0",
        "+0",
        "-0.0",
        "2024-01-02",
        "2024-1-2 3:04:05",
        "2024-01-02T03:04:05Z",
        "2024-abc",
        "1_000",
        "1__0.5",
        "12:3x",
        "8080",
        "65535",
        "3.14159",
        "1.0e-7",
        "123456789012345678901",
    }
    taken = 0
    for scalar in sorted(corpus):
        for text in (f"k: {scalar}\n", f"- {scalar}\n", f"{scalar}: v\n", f"--- {scalar}\n"):
            taken += check(text)
    assert taken > len(corpus)  # most of them read fast, each as PyYAML reads it


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="0123456789_:.+-eExXbBoO aftnNinulTZ~<=#'\"", max_size=14))
def test_generated_scalars_read_as_pyyaml_reads_them(scalar):
    check(f"k: {scalar}\n")
    check(f"- [{scalar}, {scalar}]\n")


MANIFEST = """\
# a comment before anything
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
  labels: {app: web, "tier": 'front', empty: "", none: null, tilde: ~}
  blank:
  annotations:
    note: |
      line one
      "quoted" and \\ backslash
    folded: >
      folded
      text
    unicode: "caf\\u00e9 \u00fc \U0001f600"
    control: "tab\\there\\u0001"
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, fd00::10]
  ipFamilyPolicy: PreferDualStack
  publishNotReadyAddresses: yes
  sessionAffinity: None
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
  - name: "53"
    port: 53
    targetPort: dns
    weight: 1.5
    ratio: -0.25
    big: 123456789012345678901234567890
---
---
kind: List
items:
- kind: EndpointSlice
  endpoints:
  - addresses: ["10.244.1.2"]
    conditions: {ready: true, serving: True, terminating: off}
...
--- plain text document
"""


def test_a_manifest_reads_as_pyyaml_reads_it():
    assert check(MANIFEST)
    assert same(parse_manifests(MANIFEST, "m.yaml"), _pyyaml_manifests(MANIFEST))
    assert check("") and check("# only a comment\n") and check("---\n...\n")


def _pyyaml_manifests(text: str) -> list:
    out = []
    for doc in yaml.load_all(text, Loader=LOADER):
        if isinstance(doc, dict) and doc.get("kind") == "List":
            out += doc["items"]
        elif doc is not None:
            out.append(doc)
    return out


@pytest.mark.parametrize(
    "text",
    [
        "a: &x {b: 1}\nc: *x\n",  # anchors and aliases
        "a: !!str 123\n",  # a tag
        "%TAG !e! tag:example.com,2000:\n---\na: !e!thing 1\n",
        "base: &b {x: 1}\nd:\n  <<: *b\n  y: 2\n",  # a merge key
        "when: 2024-01-02\n",  # a timestamp: a date for PyYAML, not JSON
        "hex: 0x1F\n",
        "octal: 0755\n",
        "under: 1_000\n",
        "sexagesimal: 1:20\n",
        "inf: .inf\n",
        "yes: key\n",  # a key that is not a string
        "80: http\n",
        "? [a, b]\n: complex key\n",
        "a: " + "[" * 300 + "]" * 300 + "\n",  # deeper than MAX_DEPTH
    ],
)
def test_what_json_cannot_say_the_same_way_goes_to_pyyaml(text):
    assert yamlfast.to_json(text) is None
    assert same(outcome(parse_manifests, text, "m.yaml"), outcome(_pyyaml_manifests, text))


def outcome(fn, *args):
    """What a reading gives, or the error it raises (PyYAML's refusals, e.g. a tag it does not know)."""
    try:
        return fn(*args)
    except yaml.YAMLError as e:
        return f"{type(e).__name__}: {e}"


def test_malformed_yaml_raises_pyyamls_error():
    text = "a: b\n  c: [d\n"
    assert yamlfast.to_json(text) is None
    with pytest.raises(yaml.YAMLError) as ours:
        parse_manifests(text, "m.yaml")
    with pytest.raises(yaml.YAMLError) as theirs:
        list(yaml.load_all(text, Loader=LOADER))
    assert str(ours.value) == str(theirs.value)
